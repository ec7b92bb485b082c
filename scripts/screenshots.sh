#!/usr/bin/env bash
# Screenshots of a finished sweep as a person sees it, in headless Chromium (Debian's `chromium`):
# the MLflow UI's runs page (sweep -> task -> arm -> trial runs) and compare's report.html.
# Fails if the runs page shows none of the sweep's runs, or the report references a missing image.
#
#   bash scripts/screenshots.sh runs/qs [docs [REPORT_HTML]]   # -> docs/mlflow-runs.png, docs/report.png
# REPORT_HTML defaults to the first report-*/.../report.html in SWEEP_DIR.
set -euo pipefail
sweep=$(cd "${1:?usage: scripts/screenshots.sh SWEEP_DIR [OUT_DIR [REPORT_HTML]]}" && pwd)
out=${2:-docs}
mkdir -p "$out"
browser=$(command -v chromium || command -v chromium-browser || true)
[ -n "$browser" ] || { echo "screenshots: needs chromium (apt-get install -y chromium)" >&2; exit 2; }
report=${3:-$(find "$sweep" -name report.html -path '*report-*' | sort | head -n 1)}
[ -z "$report" ] || report=$(cd "$(dirname "$report")" && pwd)/$(basename "$report")
[ -n "$report" ] || { echo "screenshots: $sweep has no report.html; run tune-dynsdpb compare first" >&2; exit 2; }
py=${PYTHON:-python3}
port=$($py -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

"$py" -m mlflow ui --backend-store-uri "sqlite:///$sweep/mlflow.db" --host 127.0.0.1 --port "$port" \
    >/tmp/screenshots-mlflow.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
up=
for _ in $(seq 360); do
  if curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1; then up=1; break; fi
  sleep 0.5
done
[ -n "$up" ] || { echo "screenshots: mlflow ui did not start: $(tail -n 1 /tmp/screenshots-mlflow.log)" >&2; exit 1; }

# the sweep's experiment and the names of its runs, from the REST API
read -r exp_id first_run < <("$py" - "$port" "$sweep" <<'PY'
import json, sys, urllib.request
port, sweep = sys.argv[1], sys.argv[2]
name = json.load(open(f"{sweep}/sweep.json"))["spec"]["name"]
def call(path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req))
exp = call("experiments/search", {"max_results": 100, "filter": f"name = '{name}'"})["experiments"][0]
runs = call("runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 1,
                            "filter": "tags.`tune_dynsdpb.role` = 'arm'"})["runs"]
assert runs, f"no arm run in experiment {name}"
print(exp["experiment_id"], runs[0]["info"]["run_id"])
PY
)
# Filtered on the trial runs, the page lists each (task, arm) run with its trials nested under it
# (MLflow shows a match's parent); no URL parameter expands the nesting itself.
filter=$("$py" -c 'import urllib.parse; print(urllib.parse.quote("tags.`tune_dynsdpb.role` = '"'"'trial'"'"'"))')
url="http://127.0.0.1:$port/#/experiments/$exp_id/runs?viewMode=table&searchFilter=$filter"
flags=(--headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,1000 --virtual-time-budget=20000)
"$browser" "${flags[@]}" --dump-dom "$url" 2>/dev/null >/tmp/screenshots-runs.html
grep -q "Training runs" /tmp/screenshots-runs.html && grep -q "runs/$first_run" /tmp/screenshots-runs.html \
  || { echo "screenshots: the MLflow runs page shows no (task, arm) run of the sweep" >&2; exit 1; }
"$browser" "${flags[@]}" --screenshot="$out/mlflow-runs.png" "$url" 2>/dev/null

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
"$browser" "${flags[@]}" --window-size=1200,2400 --screenshot="$out/report.png" "file://$report" 2>/dev/null
echo "screenshots: $out/mlflow-runs.png $out/report.png"
