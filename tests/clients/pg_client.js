// Runs queries through node-postgres (npm `pg`) and prints what it got, in the format every
// client here prints (see tests/e2e/clients.rs and psycopg_client.py).
//
// argv: the path of the `pg` module, host, port, user, password, then the queries (SQL, then
// parameters, separated by U+001F; "int:N" or "text:S"). A query without parameters goes as
// a simple query, one with parameters through the extended protocol: what `pg` does.
const [pgPath, host, port, user, password, ...queries] = process.argv.slice(2);
const { Client } = require(pgPath);

// The type names of the OIDs these tests see (`pg` reports OIDs only).
const TYPES = { 16: 'bool', 20: 'int8', 21: 'int2', 23: 'int4', 25: 'text', 700: 'float4',
  701: 'float8', 1043: 'varchar', 1114: 'timestamp', 1184: 'timestamptz', 19: 'name',
  26: 'oid', 18: 'char', 1700: 'numeric' };

const param = (p) => {
  const i = p.indexOf(':');
  return p.slice(0, i) === 'int' ? Number(p.slice(i + 1)) : p.slice(i + 1);
};
const render = (v) => (v === null ? 'NULL' : v instanceof Date ? String(v.getTime()) : String(v));
const native = (v) => (v === null || v === undefined ? '-' : v instanceof Date ? 'Date' : typeof v);

(async () => {
  const client = new Client({ host, port: Number(port), user, password, database: 'weir' });
  await client.connect();
  for (const query of queries) {
    const [text, ...params] = query.split('\x1f');
    let result;
    try {
      result = await client.query({ text, values: params.length ? params.map(param) : undefined, rowMode: 'array' });
    } catch (e) {
      console.log(['error', e.code, String(e.message).replace(/\n/g, ' ')].join('\t'));
      continue;
    }
    const first = result.rows[0];
    console.log(['columns', ...result.fields.map((f, i) =>
      `${f.name}:${TYPES[f.dataTypeID] ?? f.dataTypeID}:${native(first && first[i])}`)].join('\t'));
    for (const row of result.rows) console.log(['row', ...row.map(render)].join('\t'));
    console.log('end');
  }
  await client.end();
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
