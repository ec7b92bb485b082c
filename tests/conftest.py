import os
import sys
from pathlib import Path

# No hub: every failing hub call would otherwise wait 20-40 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")  # the HF Trainer's own MLflow callback: we log ourselves
os.environ.setdefault("WANDB_DISABLED", "true")

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402

import helpers  # noqa: E402


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return helpers.write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), num_labels=2)


@pytest.fixture(scope="session")
def tiny_bert3(tmp_path_factory) -> Path:
    return helpers.write_tiny_bert(tmp_path_factory.mktemp("tiny_bert3"), num_labels=3)


@pytest.fixture(scope="session")
def tiny_bert_regression(tmp_path_factory) -> Path:
    return helpers.write_tiny_bert(tmp_path_factory.mktemp("tiny_bert_reg"), num_labels=1)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return helpers.write_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return helpers.write_glue_dir(tmp_path_factory.mktemp("data"))
