#!/usr/bin/env bash
# Screenshots of a finished sweep as a person sees it, in headless Chromium (Debian's `chromium`):
# the MLflow UI's trial runs (the sweep's saved view: the model-training view, each trial with its
# score, method, alpha0/tau0 and rates) and, when compare has run, its report.html.
# Fails if the runs page does not show the sweep's trials with those columns, or the report
# references a missing image.
#
#   bash scripts/screenshots.sh runs/qs [docs [REPORT_HTML]]   # -> docs/mlflow-runs.png[, docs/report.png]
# REPORT_HTML defaults to the first report-*/.../report.html in SWEEP_DIR; without one, only the
# MLflow page is taken. Needs the Python of the project's venv ($PYTHON, default python3).
set -euo pipefail
sweep=$(cd "${1:?usage: scripts/screenshots.sh SWEEP_DIR [OUT_DIR [REPORT_HTML]]}" && pwd)
out=${2:-docs}
mkdir -p "$out"
browser=$(command -v chromium || command -v chromium-browser || true)
[ -n "$browser" ] || { echo "screenshots: needs chromium (apt-get install -y chromium)" >&2; exit 2; }
report=${3:-$(find "$sweep" -name report.html -path '*report-*' | sort | head -n 1)}
[ -z "$report" ] || report=$(cd "$(dirname "$report")" && pwd)/$(basename "$report")
py=${PYTHON:-python3}
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's tune_dynsdpb
port=$($py -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
work=$(mktemp -d)
log="$work/mlflow.log"

"$py" -m mlflow ui --backend-store-uri "sqlite:///$sweep/mlflow.db" --host 127.0.0.1 --port "$port" >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
up=
for _ in $(seq 360); do
  if curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1; then up=1; break; fi
  sleep 0.5
done
[ -n "$up" ] || { echo "screenshots: mlflow ui did not start: $(tail -n 1 "$log")" >&2; exit 1; }

# The MLflow page, driven over the DevTools protocol (aiohttp's websocket client) in a fresh profile:
# the sweep's saved trial view, in the model-training view; the Assistant panel (the UI opens it by
# itself on a first visit to a local server, whatever its stored setting says) is closed by its
# close button; the screenshot is taken once the trials and their columns are on the page and the
# panel's input box is gone.
"$py" - "$browser" "$port" "$sweep" "$out/mlflow-runs.png" "$work" <<'PY'
import asyncio, base64, json, pathlib, subprocess, sys, time, urllib.request

browser, port, sweep, png, work = sys.argv[1:]
from tune_dynsdpb.tracking import TAG_VIEW, VIEW_KEY, trial_view, trial_view_path

state = json.load(open(f"{sweep}/sweep.json"))
name = state["spec"]["name"]
api = f"http://127.0.0.1:{port}/api/2.0/mlflow"


def call(path, body):
    req = urllib.request.Request(f"{api}/{path}", json.dumps(body).encode(), {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req))


exp = call("experiments/search", {"max_results": 100, "filter": f"name = '{name}'"})["experiments"][0]
exp_id = exp["experiment_id"]
tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
if TAG_VIEW + VIEW_KEY not in tags:  # a sweep from before the saved view: add it, as a sweep does now
    for k, v in trial_view({t["metric"]: t["mode"] for t in state["tasks"].values()}).items():
        call("experiments/set-experiment-tag", {"experiment_id": exp_id, "key": k, "value": v})
view = json.loads(trial_view({t["metric"]: t["mode"] for t in state["tasks"].values()})[TAG_VIEW + VIEW_KEY])
trials = call("runs/search", {"experiment_ids": [exp_id], "max_results": 1000,
                              "filter": "tags.`tune_dynsdpb.role` = 'trial'"})["runs"]
assert trials, f"no trial run in experiment {name}"
names = sorted(r["info"]["run_name"] for r in trials)
url = f"http://127.0.0.1:{port}/{trial_view_path(exp_id)}"
profile = pathlib.Path(work) / "profile"
proc = subprocess.Popen([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update", "--disable-sync",
                         "--hide-scrollbars", f"--user-data-dir={profile}", "--remote-debugging-port=0",
                         "--window-size=1600,1000", "about:blank"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def wait_for(what, fn, seconds=60.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        got = fn()
        if got:
            return got
        time.sleep(0.2)
    sys.exit(f"screenshots: timed out waiting for {what}")


async def shoot():
    import aiohttp

    active = profile / "DevToolsActivePort"
    devtools = wait_for("chromium's DevTools port", lambda: active.is_file() and active.read_text().split())[0]
    pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{devtools}/json/list"))
    ws_url = next(p["webSocketDebuggerUrl"] for p in pages if p["type"] == "page")
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        ids = iter(range(1, 10**9))

        async def cdp(method, **params):
            i = next(ids)
            await ws.send_json({"id": i, "method": method, "params": params})
            async for msg in ws:
                data = json.loads(msg.data)
                if data.get("id") == i:
                    if "error" in data:
                        sys.exit(f"screenshots: {method}: {data['error']}")
                    return data.get("result", {})

        CLOSE_ASSISTANT = """(() => {
            if (!document.querySelector('[placeholder^="Ask a question"]')) return false;
            const close = [...document.querySelectorAll('button')].filter(b => {
                const r = b.getBoundingClientRect();
                return /close/i.test(b.getAttribute('aria-label') || '') && r.left > innerWidth * 0.6 && r.top < 120;
            });
            if (close.length) close[close.length - 1].click();
            return true;
        })()"""
        await cdp("Emulation.setDeviceMetricsOverride", width=1600, height=1000, deviceScaleFactor=1, mobile=False)
        await cdp("Page.addScriptToEvaluateOnNewDocument", source=(
            "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
            "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"))
        await cdp("Page.navigate", url=url)
        want = [names[0], "Model training", *[c.split("`")[1] for c in view["selectedColumns"][:3]]]
        end, last, text = time.monotonic() + 90, None, ""
        while time.monotonic() < end:  # the trials and their columns on the page, and the page settled
            text = (await cdp("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                              returnByValue=True))["result"].get("value", "")
            # the open Assistant panel: its input box (a placeholder, not in innerText); if open, its
            # close button (top right of the page) is clicked
            panel = (await cdp("Runtime.evaluate", returnByValue=True, expression=CLOSE_ASSISTANT))["result"].get(
                "value", False)
            if all(w in text for w in want) and not panel and text == last:
                break
            last = text
            await asyncio.sleep(1.0)
        else:
            missing = [w for w in want if w not in text] + (["(Assistant panel closed)"] if panel else [])
            sys.exit(f"screenshots: the MLflow runs page never showed {missing} ({url})")
        shot = await cdp("Page.captureScreenshot", format="png")
        pathlib.Path(png).write_bytes(base64.b64decode(shot["data"]))
        shown = sum(n in text for n in names)
        print(f"{png}: {url}; {shown} of {len(names)} trial runs on the page")


try:
    asyncio.run(shoot())
finally:
    import os, signal
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
PY

if [ -z "$report" ]; then
  echo "screenshots: $sweep has no report.html (run tune-dynsdpb compare for one): report.png not taken"
  exit 0
fi
"$py" - "$report" <<'PY'
import html.parser, pathlib, sys
page = pathlib.Path(sys.argv[1])
srcs = []
class P(html.parser.HTMLParser):
    def handle_starttag(self, tag, attrs):
        if tag == "img":
            srcs.append(dict(attrs).get("src", ""))
P().feed(page.read_text())
missing = [s for s in srcs if not (page.parent / s).is_file()]
if not srcs or missing:
    sys.exit(f"screenshots: {page}: broken images: {missing or 'none at all'}")
print(f"{page}: {len(srcs)} images, all present")
PY
flags=(--headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking --disable-component-update
       --disable-sync --hide-scrollbars --user-data-dir="$work/report-profile" --window-size=1200,2400)
"$browser" "${flags[@]}" --screenshot="$out/report.png" "file://$report" 2>/dev/null
echo "screenshots: $out/mlflow-runs.png $out/report.png"
