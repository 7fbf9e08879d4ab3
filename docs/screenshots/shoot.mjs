// Drives headless Chromium through MLflow 3.17's UI as docs/mlflow.md ("Compare the variants in
// MLflow") walks a user through it, and saves each view as a PNG. Run by run.py, which starts
// `mlflow ui` on a store from a real small run: MLFLOW_URL, EXPERIMENT, OUT_DIR.
import { chromium } from "playwright-core";

const { MLFLOW_URL: url, EXPERIMENT: experimentName, OUT_DIR: out } = process.env;
const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";

const response = await fetch(`${url}/ajax-api/2.0/mlflow/experiments/get-by-name?experiment_name=${
  encodeURIComponent(experimentName)}`);
if (!response.ok) throw new Error(`experiment ${experimentName} not in the store at ${url}`);
const experimentId = (await response.json()).experiment.experiment_id;

const browser = await chromium.launch({ executablePath: chromiumPath, args: ["--no-sandbox"] });
const page = await browser.newPage({ viewport: { width: 1440, height: 900 } });
page.setDefaultTimeout(90000);  // a loaded machine renders slowly

async function open(query) {
  // workflowType=machine_learning: the "Model training" side of the GenAI / Model training switch
  await page.goto(`${url}/#/experiments/${experimentId}/runs?workflowType=machine_learning&${query}`);
  await page.getByText("-seed0").first().waitFor();
  const assistant = page.getByRole("button", { name: "Close" });  // the Assistant side panel
  if (await assistant.isVisible()) await assistant.click();
}

async function columns(add, remove) {
  await page.getByRole("button", { name: "Columns" }).click();
  for (const [name, check] of [...add.map(n => [n, true]), ...remove.map(n => [n, false])]) {
    await page.getByPlaceholder("Search columns").fill(name);
    const box = page.getByRole("checkbox", { name, exact: true });
    const label = page.getByText(name, { exact: true }).last();
    if ((await box.count()) ? (await box.last().isChecked()) !== check : true) await label.click();
  }
  await page.keyboard.press("Escape");
}

async function shot(file) {
  await page.mouse.move(0, 0);  // no hover toolbar or tooltip in the picture
  await page.waitForTimeout(3000);  // charts animate in
  await page.screenshot({ path: `${out}/${file}` });
  console.log(`${out}/${file}`);
}

// 1. The runs table, best first, with the shared test-accuracy column of every model run.
await open("orderByKey=metrics.%60test_accuracy%60&orderByAsc=false");
await columns(["test_accuracy", "test_macro_f1", "train_seconds"], ["Source", "Models"]);
await shot("mlflow-runs-table.png");

// 2. The chart view: the CNN runs' per-epoch curves overlaid, one chart per metric.
await open("compareRunsMode=CHART");
const search = page.getByPlaceholder("metrics.rmse < 1 and params.model = \"tree\"");
await search.fill("tags.kind = 'cnn'");
await search.press("Enter");
await page.getByPlaceholder("Search metric charts").fill("accuracy");
await shot("mlflow-chart-curves.png");

// 3. Group by the variant tag: each chart shows the mean over seeds per variant.
await page.getByRole("button", { name: "Group by" }).click();
await page.getByRole("menuitemcheckbox", { name: "variant" }).first().click();
await page.keyboard.press("Escape");
await shot("mlflow-chart-group-by-variant.png");

await browser.close();
