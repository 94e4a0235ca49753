// Drives the Weir console in Debian's headless Chromium (playwright-core, no browser
// download): log in, run a live tail, a TUMBLE view drawn as a chart, a block with a syntax
// error, save the notebook, watch the pipelines page, then log in as a read-only user.
// Started by tests/e2e/console.rs, which checks the server side; prints one JSON line of
// what it saw and exits non-zero at the first failed step.
//
// Environment: WEIR_URL, ADMIN_USER, ADMIN_PASSWORD, READ_USER, READ_PASSWORD, NOTEBOOK
// (its name), VIEW (the view its second block creates), SCREENSHOTS (a directory),
// CHROMIUM (default /usr/bin/chromium), NODE_PATH (where playwright-core is).
import path from 'node:path';

import { launch } from './browser.mjs';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const url = env('WEIR_URL');
const shots = env('SCREENSHOTS');
const seen = {};

function check(condition, message) {
  if (!condition) throw new Error(message);
}

// Polls fn until it returns a truthy value, or fails after ms.
async function until(what, fn, ms = 30000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await fn();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

const browser = await launch();
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const consoleErrors = [];
  page.on('pageerror', (e) => consoleErrors.push(e.message));

  // Log in.
  await page.goto(url);
  await page.waitForSelector('#login');
  await page.screenshot({ path: path.join(shots, 'login.png') });
  await page.fill('#login-user', env('ADMIN_USER'));
  await page.fill('#login-password', 'not the password');
  await page.click('#login button[type=submit]');
  await until('a refused login', async () => (await page.textContent('#login-error'))?.includes('wrong'));
  await page.fill('#login-password', env('ADMIN_PASSWORD'));
  await page.click('#login button[type=submit]');
  await page.waitForSelector('ul.notebooks');

  // Cells split from a notebook join back to the same text, whatever its fences.
  seen.roundTrips = await page.evaluate(async () => {
    const { parseCells, joinCells } = await import('/assets/notebook.js');
    const texts = [
      '', '\n', 'text only', '# T\n\n```sql\nSELECT 1;\n```\n', '```sql\nA\n```\n```sql\nB\n```',
      '````sql\nSELECT \'```\';\n````\n', '```python\n```sql\n```\ntail', '```sql\nunclosed\n',
      '  ```SQL  \n  x\n  ```  \n', '```sql\n```',
    ];
    return texts.filter((t) => joinCells(parseCells(t)) !== t);
  });
  check(seen.roundTrips.length === 0, `notebooks that do not join back: ${JSON.stringify(seen.roundTrips)}`);

  // The notebook.
  const notebook = env('NOTEBOOK');
  await page.click(`a[href="#/notebooks/${encodeURIComponent(notebook)}"]`);
  await page.waitForSelector('.cell.sql[data-index="2"]');
  const cell = (i) => `.cell.sql[data-index="${i}"]`;
  const rows = async (i) => Number(await page.getAttribute(`${cell(i)} .result`, 'data-rows'));

  // A live tail: rows arrive, then more rows.
  await page.click(`${cell(0)} button.run`);
  const first = await until('the tail\'s first rows', async () => (await rows(0)) >= 3 && rows(0));
  const later = await until('more tail rows', async () => (await rows(0)) > first && rows(0));
  seen.tail = { first, later, shown: await page.locator(`${cell(0)} tbody tr`).count() };
  await page.locator(cell(0)).screenshot({ path: path.join(shots, 'notebook-tail.png') });
  await page.click(`${cell(0)} button.stop`);

  // A TUMBLE view: a chart that gains points.
  await page.click(`${cell(1)} button.run`);
  const points = async () => Number(await page.getAttribute(`${cell(1)} .chart`, 'data-points').catch(() => 0));
  const before = await until('the chart\'s first points', async () => (await points()) > 0 && points(), 45000);
  const after = await until('the chart to gain points', async () => (await points()) > before && points(), 45000);
  check(await page.locator(`${cell(1)} .chart canvas`).count() > 0, 'the chart draws on a canvas');
  seen.chart = { before, after };
  await page.screenshot({ path: path.join(shots, 'notebook.png'), fullPage: true });
  await page.locator(cell(1)).screenshot({ path: path.join(shots, 'notebook-chart.png') });

  // A syntax error: its position is marked.
  await page.click(`${cell(2)} button.run`);
  const marker = await page.waitForSelector(`${cell(2)} .error-position`);
  seen.error = {
    line: Number(await marker.getAttribute('data-line')),
    column: Number(await marker.getAttribute('data-column')),
    text: await marker.textContent(),
    state: await page.getAttribute(`${cell(2)} .result`, 'data-state'),
  };
  check(seen.error.text.includes('^'), 'the marker points at the column');
  await page.locator(cell(2)).screenshot({ path: path.join(shots, 'notebook-error.png') });

  // Edit and save: a new text cell.
  await page.click('#add-text');
  await page.keyboard.type('Saved from the browser test.');
  await page.click('h1');
  check((await page.textContent('#save-status')) === 'modified', 'an edit marks the notebook modified');
  await page.click('#save');
  await until('the save', async () => (await page.textContent('#save-status')) === 'saved');
  seen.saved = true;

  // The pipelines page: the view's rates within a few seconds.
  await page.click('a[data-nav="pipelines"]');
  const view = env('VIEW');
  const sourceRate = async () => {
    const text = await page.locator(`article[data-pipeline="${view}"] .op.source .metric b`).first().textContent().catch(() => null);
    const value = Number((text ?? '').replace(/,/g, ''));
    return Number.isFinite(value) && value > 0 ? value : null;
  };
  seen.pipelineRate = await until('the view\'s source rate on the pipelines page', sourceRate, 10000);
  seen.operators = await page.locator(`article[data-pipeline="${view}"] .op`).count();
  seen.sink = await until('the sink\'s back-pressure', async () => {
    const text = await page.locator(`article[data-pipeline="${view}"] .op.sink`).textContent().catch(() => '');
    return /busy writing\s*\d+ %/.test(text) && text;
  }, 10000);
  await page.screenshot({ path: path.join(shots, 'pipelines.png'), fullPage: true });

  // A read-only user: SELECTs run, DDL is refused, saving is not offered.
  await page.click('#logout');
  await page.waitForSelector('#login');
  await page.fill('#login-user', env('READ_USER'));
  await page.fill('#login-password', env('READ_PASSWORD'));
  await page.click('#login button[type=submit]');
  await page.waitForSelector('ul.notebooks');
  await page.goto(`${url}#/notebooks/${encodeURIComponent(notebook)}`);
  await page.waitForSelector(cell(1));
  await page.click(`${cell(0)} button.run`);
  await until('the read user\'s tail rows', async () => (await rows(0)) >= 3);
  await page.click(`${cell(0)} button.stop`);
  await page.click(`${cell(1)} button.run`);
  await until('the read user\'s DDL to be refused', async () => (await page.getAttribute(`${cell(1)} .result`, 'data-state')) === 'error');
  seen.readDdl = await page.textContent(`${cell(1)} .status`);
  seen.readCanSave = !(await page.isDisabled('#save'));
  check(consoleErrors.length === 0, `the page threw: ${consoleErrors.join('; ')}`);
  console.log(JSON.stringify(seen));
} finally {
  await browser.close();
}
