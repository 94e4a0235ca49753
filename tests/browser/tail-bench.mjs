// `weir bench console`'s browser run: opens the console in Debian's headless Chromium, runs
// the first block of notebook NOTEBOOK (a live tail) and prints, once a second, one JSON line
// with the rows the page has received, for SECONDS seconds.
//
// Environment: WEIR_URL, NOTEBOOK, SECONDS, CHROMIUM (default /usr/bin/chromium),
// NODE_PATH (where playwright-core is).
import { launch } from './browser.mjs';

const browser = await launch();
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  await page.goto(`${process.env.WEIR_URL}#/notebooks/${encodeURIComponent(process.env.NOTEBOOK)}`);
  const cell = '.cell.sql[data-index="0"]';
  await page.click(`${cell} button.run`);
  const started = Date.now();
  const seconds = Number(process.env.SECONDS ?? '30');
  for (let second = 1; second <= seconds; second += 1) {
    await new Promise((r) => setTimeout(r, started + second * 1000 - Date.now()));
    const rows = Number(await page.getAttribute(`${cell} .result`, 'data-rows'));
    const shown = await page.locator(`${cell} tbody tr`).count();
    console.log(JSON.stringify({ second, rows, shown }));
  }
  await page.click(`${cell} button.stop`);
} finally {
  await browser.close();
}
