// The pipelines page: every query as its operators, with rates from two readings a second
// apart of the same counters /metrics exports.
import { api, el } from './console.js';

const REFRESH_MS = 1000;

const number = (v, digits = 0) => (v === undefined || v === null || Number.isNaN(v)
  ? '–'
  : v.toLocaleString('en-US', { maximumFractionDigits: digits }));

function bytes(v) {
  if (v === undefined) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB'];
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${number(v, i ? 1 : 0)} ${units[i]}`;
}

function seconds(s) {
  if (s === undefined || s === null) return '–';
  if (s < 120) return `${number(s, 1)} s`;
  if (s < 7200) return `${number(s / 60, 1)} min`;
  return `${number(s / 3600, 1)} h`;
}

// A per-second rate of counter `key`, from the previous reading.
function rate(previous, now, path, key, metrics) {
  const before = previous?.values.get(`${path}/${key}`);
  const value = metrics[key];
  if (value === undefined || before === undefined) return undefined;
  return Math.max(0, (value - before) / ((now.time - previous.time) / 1000));
}

function remember(reading, path, metrics) {
  for (const [key, value] of Object.entries(metrics)) reading.values.set(`${path}/${key}`, value);
}

function operatorBox(pipeline, operator, previous, reading, nowMs) {
  const m = operator.metrics;
  const path = `${pipeline.name}/${operator.id}`;
  remember(reading, path, m);
  const line = (label, value) => el('div', { class: 'metric' }, el('span', {}, label), el('b', {}, value));
  const lines = [];
  const inRate = rate(previous, reading, path, 'records_in', m);
  const outRate = rate(previous, reading, path, 'records_out', m);
  if (operator.kind === 'source') {
    lines.push(line('out/s', number(outRate)));
    if (pipeline.watermark_ms > 0) {
      lines.push(line('watermark lag', seconds((nowMs - pipeline.watermark_ms) / 1000)));
    }
  } else if (operator.kind === 'sink') {
    lines.push(line('rows/s', number(rate(previous, reading, path, 'sink_rows_written', m))));
    lines.push(line('rows written', number(m.sink_rows_written)));
    const busy = rate(previous, reading, path, 'sink_write_seconds', m);
    if (busy !== undefined) lines.push(line('busy writing', `${number(Math.min(1, busy) * 100)} %`));
    if (m.sink_errors) lines.push(line('errors', number(m.sink_errors)));
    if (m.remote_write_samples_retried !== undefined) lines.push(line('retried', number(m.remote_write_samples_retried)));
    if (m.remote_write_queue_samples !== undefined) lines.push(line('queued (back-pressure)', number(m.remote_write_queue_samples)));
    if (m.remote_write_samples_dropped) lines.push(line('dropped', number(m.remote_write_samples_dropped)));
  } else {
    lines.push(line('in/s', number(inRate)));
    lines.push(line('out/s', number(outRate)));
  }
  if (m.operator_watermark_ms > 0) lines.push(line('watermark lag', seconds((nowMs - m.operator_watermark_ms) / 1000)));
  if (m.operator_state_bytes !== undefined) lines.push(line('state', bytes(m.operator_state_bytes)));
  if (m.operator_open_windows !== undefined) lines.push(line('open windows', number(m.operator_open_windows)));
  if (m.operator_keys_in_state !== undefined) lines.push(line('groups', number(m.operator_keys_in_state)));
  if (m.operator_emit_lag_ms !== undefined) lines.push(line('emit lag', seconds(m.operator_emit_lag_ms / 1000)));
  if (m.late_records_dropped !== undefined) lines.push(line('late drops', number(m.late_records_dropped)));
  if (m.operator_errors) lines.push(line('errors', number(m.operator_errors)));
  const name = operator.id.replace(/^\d+_/, '').replace(/^sink_/, '→ ').replace(/^source_/, 'source: ');
  return el('div', { class: `op ${operator.kind}`, 'data-operator': operator.id }, el('div', { class: 'name' }, name), lines);
}

function pipelineCard(pipeline, previous, reading, nowMs) {
  const checkpoint = pipeline.checkpoint
    ? `epoch ${pipeline.checkpoint.epoch}, ${seconds(pipeline.checkpoint.age_s)} ago, ${bytes(pipeline.checkpoint.bytes)}`
    : 'none yet';
  const graph = [];
  pipeline.operators.forEach((operator, i) => {
    if (i) graph.push(el('div', { class: 'arrow' }, '→'));
    graph.push(operatorBox(pipeline, operator, previous, reading, nowMs));
  });
  const lookups = pipeline.lookups.map((l) => {
    remember(reading, `${pipeline.name}/lookup/${l.table}`, l.metrics);
    const misses = l.metrics.lookup_misses ?? 0;
    const total = l.metrics.lookups ?? 0;
    return el('li', {}, `lookup ${l.table}: ${number(rate(previous, reading, `${pipeline.name}/lookup/${l.table}`, 'lookups', l.metrics))}/s, misses ${number(misses)} of ${number(total)}`);
  });
  const partitions = pipeline.partitions.length
    ? el('table', { class: 'partitions' },
      el('thead', {}, el('tr', {}, el('th', {}, 'partition'), el('th', {}, 'lag (records)'), el('th', {}, 'records/s'), el('th', {}, 'watermark'))),
      el('tbody', {}, pipeline.partitions.map((p) => {
        const path = `${pipeline.name}/partition/${p.source}/${p.partition}`;
        remember(reading, path, p.metrics);
        const watermark = p.metrics.source_partition_watermark_ms;
        return el('tr', {},
          el('td', {}, `${p.source}/${p.partition}`),
          el('td', {}, number(p.metrics.source_partition_lag)),
          el('td', {}, number(rate(previous, reading, path, 'source_partition_records_in', p.metrics))),
          el('td', {}, watermark > 0 ? `${seconds((nowMs - watermark) / 1000)} behind` : '–'));
      })))
    : null;
  return el('article', { class: `pipeline ${pipeline.status}`, 'data-pipeline': pipeline.name },
    el('header', {},
      el('h2', {}, pipeline.name),
      el('span', { class: 'kind' }, pipeline.kind),
      el('span', { class: `badge ${pipeline.status}` }, pipeline.status),
      el('span', {}, `from ${pipeline.input}`),
      el('span', {}, `up ${seconds(pipeline.uptime_s)}`),
      pipeline.restarts ? el('span', { class: 'restarts' }, `${pipeline.restarts} restarts`) : null,
      el('span', {}, `last checkpoint: ${checkpoint}`),
      pipeline.instances.length ? el('span', {}, `instances: ${pipeline.instances.join(', ')}`) : null),
    pipeline.cause ? el('p', { class: 'error' }, pipeline.cause) : null,
    el('div', { class: 'graph' }, graph),
    lookups.length ? el('ul', { class: 'lookups' }, lookups) : null,
    partitions);
}

export function pipelinesPage(main) {
  const list = el('div', { class: 'pipelines' });
  const updated = el('span', { class: 'updated' });
  main.append(el('div', { class: 'toolbar' }, el('h1', {}, 'Pipelines'), updated), list);
  let previous = null;
  let stopped = false;
  let timer = null;
  const tick = async () => {
    try {
      const data = await api('GET', '/api/pipelines');
      if (stopped) return;
      const reading = { time: data.time_ms, values: new Map() };
      list.replaceChildren(...data.pipelines.map((p) => pipelineCard(p, previous, reading, data.time_ms)));
      if (!data.pipelines.length) list.append(el('p', {}, 'No pipeline runs. Create a materialized view or a sink.'));
      previous = reading;
      updated.textContent = `updated ${new Date(data.time_ms).toLocaleTimeString()}`;
    } catch (e) {
      updated.textContent = e.message;
    }
    if (!stopped) timer = setTimeout(tick, REFRESH_MS);
  };
  tick();
  return () => { stopped = true; clearTimeout(timer); };
}
