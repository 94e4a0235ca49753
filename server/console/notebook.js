// Notebooks: Markdown documents whose ```sql blocks run live against Weir.
import { api, el, session } from './console.js';

// Rows a live tail keeps on screen (newest first), and a finite result shows.
const TAIL_ROWS = 200;
const TABLE_ROWS = 500;
// Lines a chart draws at most (one per number column and label combination).
const MAX_LINES = 12;
// How often a materialized view's block reads the view again.
const VIEW_REFRESH_MS = 1000;
const QUERY_REFRESH_MS = 2000;

export async function notebookList(main) {
  const { notebooks } = await api('GET', '/api/notebooks');
  const name = el('input', { id: 'new-notebook', placeholder: 'new-notebook.md' });
  const create = el('form', { class: 'new' }, name, el('button', { type: 'submit' }, 'New notebook'));
  create.addEventListener('submit', (event) => {
    event.preventDefault();
    let file = name.value.trim();
    if (!file) return;
    if (!file.endsWith('.md')) file += '.md';
    location.hash = `#/notebooks/${encodeURIComponent(file)}`;
  });
  main.append(
    el('h1', {}, 'Notebooks'),
    el('ul', { class: 'notebooks' },
      notebooks.map((n) => el('li', {}, el('a', { href: `#/notebooks/${encodeURIComponent(n)}` }, n)))),
    notebooks.length ? null : el('p', {}, 'No notebooks yet: Markdown files under --notebooks (default queries/).'),
    session.current?.admin ? create : null,
  );
  return () => {};
}

// Splits Markdown into text and ```sql cells, so that joining them gives the text back.
export function parseCells(text) {
  const cells = [];
  let lines = [];
  let fence = null;
  for (const line of text.split('\n')) {
    const ticks = /^\s*(`{3,})(.*)$/.exec(line);
    if (!fence) {
      if (ticks && ticks[2].trim().split(/\s+/)[0].toLowerCase() === 'sql') {
        if (lines.length) cells.push({ type: 'text', text: lines.join('\n') });
        fence = { open: line, ticks: ticks[1].length, code: [] };
        lines = [];
      } else {
        if (ticks) fence = { other: true, ticks: ticks[1].length };
        lines.push(line);
      }
    } else if (fence.other) {
      lines.push(line);
      if (ticks && ticks[1].length >= fence.ticks && !ticks[2].trim()) fence = null;
    } else if (ticks && ticks[1].length >= fence.ticks && !ticks[2].trim()) {
      cells.push({ type: 'sql', open: fence.open, close: line, code: fence.code.join('\n'), bare: !fence.code.length });
      fence = null;
    } else {
      fence.code.push(line);
    }
  }
  if (fence && !fence.other) {
    cells.push({ type: 'sql', open: fence.open, close: null, code: fence.code.join('\n'), bare: !fence.code.length });
  } else if (lines.length) {
    cells.push({ type: 'text', text: lines.join('\n') });
  }
  return cells;
}

// A parsed block keeps its fences as written; one without code lines (`bare`) gets none back,
// and an unclosed one (the end of the file) no closing fence.
export function joinCells(cells) {
  return cells.map((c) => {
    if (c.type === 'text') return c.text;
    const lines = [c.open ?? '```sql'];
    if (!(c.bare && c.code === '')) lines.push(c.code);
    if (c.close !== null) lines.push(c.close ?? '```');
    return lines.join('\n');
  }).join('\n');
}

// A small Markdown renderer for text cells: headings, lists, paragraphs, code, emphasis,
// links. Everything is escaped first.
function renderMarkdown(text) {
  const escape = (s) => s.replace(/[&<>"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' }[c]));
  const inline = (s) => escape(s)
    .replace(/`([^`]+)`/g, '<code>$1</code>')
    .replace(/\*\*([^*]+)\*\*/g, '<strong>$1</strong>')
    .replace(/\*([^*]+)\*/g, '<em>$1</em>')
    .replace(/\[([^\]]+)\]\((https?:[^)\s]+)\)/g, '<a href="$2" rel="noopener">$1</a>');
  const out = [];
  let list = null;
  let code = null;
  let paragraph = [];
  const flush = () => {
    if (paragraph.length) out.push(`<p>${inline(paragraph.join(' '))}</p>`);
    paragraph = [];
    if (list) out.push(`<ul>${list.map((i) => `<li>${inline(i)}</li>`).join('')}</ul>`);
    list = null;
  };
  for (const line of text.split('\n')) {
    if (code !== null) {
      if (/^\s*```/.test(line)) {
        out.push(`<pre>${escape(code.join('\n'))}</pre>`);
        code = null;
      } else code.push(line);
      continue;
    }
    const heading = /^(#{1,6})\s+(.*)$/.exec(line);
    const item = /^\s*[-*]\s+(.*)$/.exec(line);
    if (/^\s*```/.test(line)) {
      flush();
      code = [];
    } else if (heading) {
      flush();
      out.push(`<h${heading[1].length}>${inline(heading[2])}</h${heading[1].length}>`);
    } else if (item) {
      if (paragraph.length) flush();
      (list ??= []).push(item[1]);
    } else if (!line.trim()) {
      flush();
    } else if (list) {
      list[list.length - 1] += ` ${line.trim()}`;
    } else {
      paragraph.push(line.trim());
    }
  }
  if (code !== null) out.push(`<pre>${escape(code.join('\n'))}</pre>`);
  flush();
  return out.join('\n');
}

// The events of a server-sent event stream read with fetch.
async function* serverEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let at;
    while ((at = buffer.indexOf('\n\n')) >= 0) {
      const chunk = buffer.slice(0, at);
      buffer = buffer.slice(at + 2);
      let event = 'message';
      let data = '';
      for (const line of chunk.split('\n')) {
        if (line.startsWith('event: ')) event = line.slice(7);
        else if (line.startsWith('data: ')) data += line.slice(6);
      }
      if (data) yield { event, data: JSON.parse(data) };
    }
  }
}

// Runs `sql`, calling on[event](data) for each event; resolves when the stream ends.
async function runSql(sql, signal, on) {
  const response = await api('POST', '/api/run', { sql }, { raw: true, signal });
  if (!response.ok) {
    const json = await response.json().catch(() => ({}));
    throw new Error(json.error ?? `${response.status} ${response.statusText}`);
  }
  for await (const { event, data } of serverEvents(response)) on[event]?.(data);
}

const sleep = (ms, signal) => new Promise((resolve) => {
  const timer = setTimeout(resolve, ms);
  signal.addEventListener('abort', () => { clearTimeout(timer); resolve(); }, { once: true });
});

function formatValue(value, kind) {
  if (value === null || value === undefined) return '';
  if (kind === 'time' && typeof value === 'number') return new Date(value).toISOString().replace('T', ' ').replace('Z', '');
  if (kind === 'number' && typeof value === 'number' && !Number.isInteger(value)) return value.toPrecision(6).replace(/\.?0+$/, '');
  return String(value);
}

function table(columns, rows) {
  return el('table', {},
    el('thead', {}, el('tr', {}, columns.map((c) => el('th', { title: c.type }, c.name)))),
    el('tbody', {}, rows.map((row) => el('tr', {}, row.map((v, i) => el('td', { class: columns[i].kind }, formatValue(v, columns[i].kind)))))));
}

// A line chart of a result with a time column: one line per number column and label
// combination (text columns), at most MAX_LINES. Returns the points drawn, or null when the
// result has no time or number column.
function chart(container, columns, rows, previous) {
  const times = columns.map((c, i) => [c, i]).filter(([c]) => c.kind === 'time');
  if (!times.length) return null;
  const [, x] = times.find(([c]) => c.name === 'window_end') ?? times.find(([c]) => c.name === 'window_start') ?? times[0];
  // An identifier (`vehicle_id`) names a line; it is not a value to draw.
  const isId = (c) => /(^|_)id$/i.test(c.name);
  const numbers = columns.map((c, i) => [c, i]).filter(([c]) => c.kind === 'number' && !isId(c));
  const labels = columns.map((c, i) => [c, i]).filter(([c]) => c.kind === 'text' || c.kind === 'bool' || isId(c));
  if (!numbers.length) return null;
  const xs = [...new Set(rows.map((r) => r[x]).filter((v) => v !== null))].sort((a, b) => a - b);
  const position = new Map(xs.map((v, i) => [v, i]));
  const series = new Map();
  for (const row of rows) {
    if (row[x] === null) continue;
    const label = labels.map(([, i]) => row[i]).join(' ');
    for (const [column, i] of numbers) {
      const key = label ? `${column.name} ${label}` : column.name;
      if (!series.has(key)) {
        if (series.size >= MAX_LINES) continue;
        series.set(key, new Array(xs.length).fill(null));
      }
      series.get(key)[position.get(row[x])] = typeof row[i] === 'number' ? row[i] : Number(row[i]);
    }
  }
  const keys = [...series.keys()].sort();
  const data = [xs.map((v) => v / 1000), ...keys.map((k) => series.get(k))];
  const points = keys.reduce((n, k) => n + series.get(k).filter((v) => v !== null).length, 0);
  const palette = ['#2563eb', '#dc2626', '#16a34a', '#9333ea', '#ea580c', '#0891b2', '#ca8a04', '#db2777', '#4b5563', '#65a30d', '#7c3aed', '#0d9488'];
  const width = Math.max(320, container.clientWidth || 720);
  if (previous && previous.keys.join('\n') === keys.join('\n')) {
    previous.plot.setData(data);
    return { ...previous, points };
  }
  previous?.plot.destroy();
  container.replaceChildren();
  const plot = new uPlot({
    width,
    height: 260,
    series: [{}, ...keys.map((k, i) => ({ label: k, stroke: palette[i % palette.length], width: 1.5, spanGaps: true }))],
    axes: [{}, {}],
  }, data, container);
  return { plot, keys, points };
}

// One ```sql cell: its editor, and a result that runs until the cell is stopped.
class SqlCell {
  constructor(cell, index) {
    this.cell = cell;
    this.controller = null;
    this.editor = el('textarea', { class: 'code', spellcheck: 'false', rows: Math.max(2, cell.code.split('\n').length) });
    this.editor.value = cell.code;
    this.editor.addEventListener('input', () => {
      cell.code = this.editor.value;
      cell.bare = false;
      this.editor.rows = Math.max(2, cell.code.split('\n').length);
      this.onchange?.();
    });
    this.editor.addEventListener('keydown', (event) => {
      if (event.key === 'Enter' && (event.ctrlKey || event.metaKey || event.shiftKey)) {
        event.preventDefault();
        this.run();
      }
    });
    this.status = el('span', { class: 'status' });
    this.result = el('div', { class: 'result', 'data-state': 'idle', 'data-rows': '0' });
    this.root = el('section', { class: 'cell sql', 'data-index': index },
      this.editor,
      el('div', { class: 'actions' },
        el('button', { class: 'run', onclick: () => this.run(), title: 'Shift+Enter' }, 'Run'),
        el('button', { class: 'stop', onclick: () => this.stop() }, 'Stop'),
        this.status),
      this.result);
  }

  stop() {
    this.controller?.abort();
    this.controller = null;
    if (this.result.dataset.state === 'running' || this.result.dataset.state === 'live') {
      this.setState('stopped');
    }
  }

  setState(state, text = state) {
    this.result.dataset.state = state;
    this.status.textContent = text;
  }

  async run() {
    this.stop();
    const controller = new AbortController();
    this.controller = controller;
    const signal = controller.signal;
    const sql = this.editor.value;
    this.result.replaceChildren();
    this.result.dataset.rows = '0';
    this.setState('running');
    const view = /^\s*create\s+materialized\s+view\s+(?:if\s+not\s+exists\s+)?([\w."]+)/i.exec(sql)?.[1];
    try {
      const last = await this.stream(sql, signal);
      if (signal.aborted) return;
      if (last.error) return;
      if (view) {
        await this.refresh(`SELECT * FROM ${view}`, VIEW_REFRESH_MS, signal);
      } else if (last.finite && /^\s*select\b[\s\S]*\bfrom\b/i.test(sql) && !sql.trim().replace(/;\s*$/, '').includes(';')) {
        await this.refresh(sql, QUERY_REFRESH_MS, signal);
      } else {
        this.setState('done');
      }
    } catch (e) {
      if (!signal.aborted) this.showError({ message: e.message });
    }
  }

  // Streams one run into the result; returns what its last result was.
  async stream(sql, signal) {
    let columns = [];
    let rows = [];
    let live = false;
    let body = null;
    const last = { finite: false, error: false };
    await runSql(sql, signal, {
      schema: (data) => {
        columns = data.columns;
        rows = [];
        live = !!data.live;
        body = el('tbody');
        this.result.replaceChildren(el('table', {},
          el('thead', {}, el('tr', {}, columns.map((c) => el('th', { title: c.type }, c.name)))),
          body));
        if (live) this.setState('live', 'live tail');
      },
      rows: (data) => {
        const total = Number(this.result.dataset.rows) + data.rows.length;
        this.result.dataset.rows = String(total);
        if (live) {
          for (const row of data.rows) {
            body.prepend(el('tr', {}, row.map((v, i) => el('td', { class: columns[i].kind }, formatValue(v, columns[i].kind)))));
          }
          while (body.rows.length > TAIL_ROWS) body.lastChild.remove();
          this.status.textContent = `live tail: ${total} rows`;
        } else if (rows.length < TABLE_ROWS) {
          rows.push(...data.rows.slice(0, TABLE_ROWS - rows.length));
        }
      },
      done: (data) => {
        last.finite = !live;
        if (!live) {
          this.result.replaceChildren(table(columns, rows));
          this.setState('done', `${data.rows} rows${data.truncated ? ' (first shown)' : ''}`);
        } else {
          this.setState('done', `${data.rows} rows (limit reached)`);
        }
      },
      command: (data) => {
        this.result.append(el('p', { class: 'command' }, `✓ ${data.tag}`));
      },
      error: (data) => {
        last.error = true;
        this.showError(data);
      },
    });
    return last;
  }

  // Reads `sql` again every `ms` while the cell runs: a chart when it has a time column,
  // else a table.
  async refresh(sql, ms, signal) {
    const box = el('div', { class: 'live' });
    const chartBox = el('div', { class: 'chart', 'data-points': '0' });
    const tableBox = el('div', { class: 'table' });
    box.append(chartBox, tableBox);
    this.result.append(box);
    let plot = null;
    while (!signal.aborted) {
      let columns = [];
      let rows = [];
      let failed = null;
      await runSql(sql, signal, {
        schema: (data) => { columns = data.columns; rows = []; },
        rows: (data) => rows.push(...data.rows),
        error: (data) => { failed = data; },
      }).catch((e) => { if (!signal.aborted) failed = { message: e.message }; });
      if (signal.aborted) return;
      if (failed) {
        this.showError(failed);
        return;
      }
      this.result.dataset.rows = String(rows.length);
      plot = chart(chartBox, columns, rows, plot);
      if (plot) {
        chartBox.dataset.points = String(plot.points);
        // The rows stay one click away.
        const open = tableBox.querySelector('details')?.open ?? false;
        tableBox.replaceChildren(el('details', { open },
          el('summary', {}, `${rows.length} rows`), table(columns, rows.slice(0, TABLE_ROWS))));
      } else {
        tableBox.replaceChildren(table(columns, rows.slice(0, TABLE_ROWS)));
      }
      this.setState('live', `live: ${rows.length} rows, read every ${ms / 1000} s`);
      await sleep(ms, signal);
    }
  }

  showError(error) {
    this.setState('error', error.sqlstate ? `error ${error.sqlstate}` : 'error');
    const parts = [el('p', { class: 'message' }, error.message)];
    const position = error.position;
    if (position) {
      const lines = this.editor.value.split('\n');
      const line = lines[position.line - 1] ?? '';
      parts.push(el('pre', { class: 'error-position', 'data-line': position.line, 'data-column': position.column },
        `line ${position.line}, column ${position.column}\n${line}\n${' '.repeat(Math.max(0, position.column - 1))}^`));
      const offset = lines.slice(0, position.line - 1).reduce((n, l) => n + l.length + 1, 0) + position.column - 1;
      this.editor.focus();
      this.editor.setSelectionRange(offset, Math.min(offset + 1, this.editor.value.length));
    }
    this.result.append(el('div', { class: 'error' }, parts));
  }
}

class TextCell {
  constructor(cell) {
    this.cell = cell;
    this.view = el('div', { class: 'markdown', title: 'click to edit' });
    this.editor = el('textarea', { class: 'prose', hidden: true });
    this.view.innerHTML = renderMarkdown(cell.text) || '<p class="empty">(empty: click to write)</p>';
    this.view.addEventListener('click', () => {
      this.editor.value = cell.text;
      this.editor.rows = Math.max(3, cell.text.split('\n').length);
      this.view.hidden = true;
      this.editor.hidden = false;
      this.editor.focus();
    });
    this.editor.addEventListener('input', () => {
      cell.text = this.editor.value;
      this.onchange?.();
    });
    this.editor.addEventListener('blur', () => {
      this.view.innerHTML = renderMarkdown(cell.text) || '<p class="empty">(empty: click to write)</p>';
      this.view.hidden = false;
      this.editor.hidden = true;
    });
    this.root = el('section', { class: 'cell text' }, this.view, this.editor);
  }

  stop() {}
}

export async function notebookPage(main, name) {
  let text = '';
  // The version this editor started from: a save does not overwrite a file changed since.
  let version = null;
  try {
    ({ text, version } = await api('GET', `/api/notebooks/${name.split('/').map(encodeURIComponent).join('/')}`));
  } catch (e) {
    if (!/no notebook/.test(e.message)) throw e;
    text = `# ${name.replace(/\.md$/, '')}\n\nNotes, then a query:\n\n\`\`\`sql\nSHOW STREAMS;\n\`\`\`\n`;
  }
  const cells = parseCells(text);
  const saved = el('span', { id: 'save-status' }, 'saved');
  const admin = session.current?.admin;
  const save = el('button', {
    id: 'save', disabled: !admin, title: admin ? 'write the .md file' : 'saving writes the server\'s files: admins only',
  }, 'Save');
  const list = el('div', { class: 'cells' });
  const views = [];
  const changed = () => { saved.textContent = 'modified'; };
  const add = (cell) => {
    const view = cell.type === 'sql' ? new SqlCell(cell, views.filter((v) => v instanceof SqlCell).length) : new TextCell(cell);
    view.onchange = changed;
    views.push(view);
    list.append(view.root);
    return view;
  };
  cells.forEach(add);
  save.addEventListener('click', async () => {
    try {
      ({ version } = await api('PUT', `/api/notebooks/${name.split('/').map(encodeURIComponent).join('/')}`, { text: joinCells(cells), base: version }));
      saved.textContent = 'saved';
    } catch (e) {
      saved.textContent = `not saved: ${e.message}`;
    }
  });
  const addSql = el('button', { id: 'add-sql' }, '+ SQL');
  addSql.addEventListener('click', () => {
    const cell = { type: 'sql', code: '' };
    cells.push({ type: 'text', text: '' }, cell);
    add(cells[cells.length - 2]);
    add(cell).editor.focus();
    changed();
  });
  const addText = el('button', { id: 'add-text' }, '+ Text');
  addText.addEventListener('click', () => {
    const cell = { type: 'text', text: '' };
    cells.push(cell);
    add(cell).view.click();
    changed();
  });
  main.append(
    el('div', { class: 'toolbar' }, el('h1', {}, name), save, saved),
    list,
    el('div', { class: 'toolbar' }, addSql, addText),
  );
  return () => views.forEach((v) => v.stop());
}
