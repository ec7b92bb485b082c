# Sourced by test.sh and quickstart.sh: a fresh virtualenv in .venv with the package and EXTRAS.
python3 -m venv .venv
. .venv/bin/activate
# The CPU build of torch first: a plain `pip install torch` pulls several GB of CUDA packages.
pip install -q torch==2.13.0
pip install -q -c constraints.txt -e ".[${EXTRAS}]"  # constraints.txt: see private_apis.py
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
