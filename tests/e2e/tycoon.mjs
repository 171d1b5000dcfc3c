// Plays the tycoon example in headless Chromium, through its web page, as a person would.
//
//   node tycoon.mjs play   BASE_URL   joins as user 1001, earns, buys a speed upgrade, leaves,
//                                     rejoins and checks nothing was lost; stays in the game
//                                     after earning once more, then prints the numbers.
//   node tycoon.mjs expect BASE_URL MONEY SPEED
//                                     joins and checks the numbers (after a server restart).
//
// Chromium is Debian's (/usr/bin/chromium, or BLOX_CHROMIUM); the flags are the ones this
// machine's closed network needs.
import { chromium } from "playwright-core";

const [mode, base, ...expected] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.BLOX_CHROMIUM || "/usr/bin/chromium",
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});

function fail(message) {
  console.error(`tycoon e2e: ${message}`);
  process.exitCode = 1;
}

async function stat(page, name) {
  return Number(await page.textContent(`#${name}`));
}

async function waitForStat(page, name, value) {
  await page.waitForFunction(
    ([name, value]) => document.getElementById(name).textContent === String(value),
    [name, value],
    { timeout: 15000 },
  );
}

async function join(page) {
  await page.goto(base);
  await page.fill("#userId", "1001");
  await page.fill("#name", "builderman");
  await page.click("#joinButton");
  await page.waitForSelector("#status[data-loaded=true]", { timeout: 15000 });
}

try {
  const page = await browser.newPage();
  if (mode === "play") {
    await join(page);
    const startMoney = await stat(page, "Money");
    if (startMoney !== 0) fail(`a new player starts with 0 money, not ${startMoney}`);
    for (let i = 0; i < 12; i++) {
      await page.click("button[data-action=earn]");
    }
    await waitForStat(page, "Money", 120);
    await page.click("button[data-action=buySpeed]");
    await waitForStat(page, "SpeedLevel", 2);
    await waitForStat(page, "Money", 20);
    await page.click("#leaveButton");
    await page.waitForSelector("#status:not([data-loaded])");
    await join(page);
    await waitForStat(page, "Money", 20);
    await waitForStat(page, "SpeedLevel", 2);
    await page.click("button[data-action=earn]");
    await waitForStat(page, "Money", 40);
    console.log(`money ${await stat(page, "Money")} speed ${await stat(page, "SpeedLevel")}`);
  } else if (mode === "expect") {
    const [money, speed] = expected.map(Number);
    await join(page);
    await waitForStat(page, "Money", money);
    await waitForStat(page, "SpeedLevel", speed);
    console.log(`money ${money} speed ${speed}`);
  } else {
    fail(`unknown mode ${mode}`);
  }
} catch (error) {
  fail(error.message);
} finally {
  await browser.close();
}
