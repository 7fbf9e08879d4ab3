// Walks docs/mlflow.md's "Step by step" in headless Chromium as a person would: a fresh
// profile, MLflow's home page, then each numbered step of the page, clicking and typing what it
// says; saves the pictures the page shows. A step whose button, field or menu entry is not
// found stops the walk with the step and the element named (and failed-step.png of the page).
// Run by run.py, which starts `mlflow ui`: MLFLOW_URL, EXPERIMENT, OUT_DIR.
import { chromium } from "playwright-core";

const { MLFLOW_URL: url, EXPERIMENT: experiment, OUT_DIR: out } = process.env;
const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";
const FIND_TIMEOUT_MS = 60000;  // a loaded machine renders slowly

class NotFound extends Error {}

const browser = await chromium.launch({ executablePath: chromiumPath, args: ["--no-sandbox"] });
const context = await browser.newContext({ viewport: { width: 1440, height: 900 } });  // a fresh profile
const page = await context.newPage();
page.setDefaultTimeout(FIND_TIMEOUT_MS);

/** The first element ``locator`` finds, once visible; NotFound naming ``what`` if none shows. */
async function find(locator, what) {
  try {
    await locator.first().waitFor({ state: "visible", timeout: FIND_TIMEOUT_MS });
  } catch {
    throw new NotFound(`${what} not found`);
  }
  return locator.first();
}

async function click(locator, what) {
  await (await find(locator, what)).click();
}

async function type(locator, what, text, { enter = false } = {}) {
  const field = await find(locator, what);
  await field.fill(text);
  if (enter) await field.press("Enter");
}

async function shot(file) {
  await page.mouse.move(0, 0);  // no hover toolbar or tooltip in the picture
  await page.waitForTimeout(3000);  // charts animate in
  await page.screenshot({ path: `${out}/${file}` });
  console.log(`  ${out}/${file}`);
}

/** How many of the experiment's runs the store finds for ``filter`` (MLflow's REST API). */
async function countRuns(filter) {
  const api = `${url}/ajax-api/2.0/mlflow`;
  const found = await (await fetch(`${api}/experiments/get-by-name?experiment_name=${
    encodeURIComponent(experiment)}`)).json();
  const response = await fetch(`${api}/runs/search`, {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ experiment_ids: [found.experiment.experiment_id], filter, max_results: 1000 }),
  });
  return ((await response.json()).runs || []).length;
}

const runsTable = () => page.getByText(/^\d+ matching runs?$/);
const searchRuns = () => page.getByPlaceholder('metrics.rmse < 1 and params.model = "tree"');

/** Tick ``add`` and untick ``remove`` in the runs table's Columns menu. */
async function columns(add, remove) {
  await click(page.getByRole("button", { name: "Columns" }), 'the "Columns" button');
  for (const [name, wanted] of [...add.map(n => [n, true]), ...remove.map(n => [n, false])]) {
    await type(page.getByPlaceholder("Search columns"), 'the "Search columns" field', name);
    const label = await find(page.getByText(name, { exact: true }).last(), `the column ${name}`);
    const box = page.getByRole("checkbox", { name, exact: true });
    if (!(await box.count()) || (await box.last().isChecked()) !== wanted) await label.click();
  }
  await page.keyboard.press("Escape");
}

// The steps: each title is the bold start of a numbered step of docs/mlflow.md "Step by step"
// (tests/test_docs.py holds them equal).
const steps = [
  ["1. Model training, then the experiment.", async () => {
    await page.goto(`${url}/`);
    await click(page.getByRole("button", { name: "Model training", exact: true }),
      'the "Model training" switch at the top of the sidebar');
    await click(page.getByRole("link", { name: experiment, exact: true }),
      `the experiment ${experiment} under "Recent Experiments"`);
    await find(runsTable(), "the Runs table (its count of matching runs)");
    const assistant = page.getByRole("button", { name: "Close" });  // the MLflow Assistant panel
    if (await assistant.isVisible()) await assistant.click();
  }],
  ["2. The runs table.", async () => {
    await columns(["test_accuracy", "test_macro_f1", "train_seconds"], ["Source", "Models"]);
    await click(page.getByRole("button", { name: /^Sort/ }), 'the "Sort" button');
    await type(page.getByRole("menu").getByPlaceholder("Search"), 'the "Sort" menu\'s search field',
      "test_accuracy");
    await click(page.getByRole("menuitemcheckbox", { name: "test_accuracy", exact: true }),
      'test_accuracy in the "Sort" menu');
    await page.keyboard.press("Escape");
    await find(page.getByRole("button", { name: "Sort: test_accuracy" }), 'the button "Sort: test_accuracy"');
    await shot("mlflow-runs-table.png");
  }],
  ["3. The per-epoch curves, overlaid: the chart view.", async () => {
    await click(page.locator('label:has(input[value="CHART"])'), 'the "Chart view" button');
    await type(searchRuns(), "the runs' search box", "tags.kind = 'cnn'", { enter: true });
    await click(page.getByRole("button", { name: "Toggle visibility of runs" }),
      "the eye icon above the run list");
    await click(page.getByRole("menuitemradio", { name: "Show all runs" }), '"Show all runs"');
    await type(page.getByPlaceholder("Search metric charts"), 'the "Search metric charts" field', "accuracy");
    await shot("mlflow-chart-curves.png");
  }],
  ["4. Group by variant.", async () => {
    await click(page.getByRole("button", { name: "Group by" }), 'the "Group by" button');
    await type(page.getByRole("menu").getByPlaceholder("Search"), 'the "Group by" menu\'s search field',
      "variant");
    await click(page.getByRole("menuitemcheckbox", { name: "variant", exact: true }),  // Tags come first
      'the tag variant in the "Group by" menu');
    await page.keyboard.press("Escape");
    await shot("mlflow-chart-group-by-variant.png");
  }],
  ["5. The paper's models, and ours.", async () => {
    const filter = "tags.paper_model LIKE 'none%'";
    const matching = await countRuns(filter);
    if (!matching) throw new NotFound(`a run matching ${filter} (the store has none)`);
    await type(searchRuns(), "the runs' search box", filter, { enter: true });
    await find(page.getByText(`${matching} matching run${matching > 1 ? "s" : ""}`, { exact: true }),
      `the ${matching} runs matching ${filter}`);
  }],
];

let current = "";
try {
  for (const [title, action] of steps) {
    current = title;
    console.log(`step ${title}`);
    await action();
  }
} catch (error) {
  await page.screenshot({ path: `${out}/failed-step.png` }).catch(() => {});
  const reason = error instanceof NotFound ? error.message : error.message.split("\n")[0];
  console.error(`ERROR: step "${current}" of docs/mlflow.md: ${reason} (the page: ${out}/failed-step.png)`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
