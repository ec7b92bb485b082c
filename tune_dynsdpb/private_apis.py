"""Every use of another library's private API, in one table, with the version it was checked against.

A private API is a name with a leading underscore (a method we call or override, an attribute we
read or set), an internal module, or an object pickled with its internals. Everything else the
project uses of transformers, accelerate, Ray, Optuna and MLflow is public. Each row says what is
used, where (the file and the exact source text, which ``tests/test_private_apis.py`` finds
there), why no public API does it, and the installed version it was checked against; that test
fails when the installed version differs (re-check the row against the new release, then set the
version) or when a listed use is gone from its file (drop the row). A new private use gets its row
here first. Public replacements made so far: ``Trainer._train_batch_size`` became
``TrainingArguments.train_batch_size``, and ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (an internal of
``transformers.models.auto.modeling_auto``) became the exported ``transformers.MODEL_FOR_CAUSAL_LM_MAPPING``.
"""

from __future__ import annotations

from typing import NamedTuple


class PrivateUse(NamedTuple):
    name: str      # the private name, as its library spells it
    where: str     # the file, relative to the repository root
    text: str      # the exact source text of the use in that file
    why: str       # why no public API does it (and the public route, where one would take a redesign)
    library: str   # the distribution, as importlib.metadata names it
    checked: str   # the version the use was checked against


USES: tuple[PrivateUse, ...] = (
    PrivateUse(
        "transformers.Trainer._save_checkpoint (overridden)", "tune_dynsdpb/trainer.py",
        "def _save_checkpoint(self, model, trial)",
        "a checkpoint must hold the soft-target cache and the schedule before any on_save callback (the Tune "
        "reporter) copies the folder; the only hook between writing the folder and on_save is this method "
        "(public route: a TrainerCallback.on_save registered ahead of every user callback)",
        "transformers", "5.25.0"),
    PrivateUse(
        "transformers.Trainer._get_output_dir", "tune_dynsdpb/trainer.py", "self._get_output_dir(trial=trial)",
        "the folder the stock _save_checkpoint just wrote (it depends on a hyperparameter-search trial); "
        "without a trial it is args.output_dir",
        "transformers", "5.25.0"),
    PrivateUse(
        "transformers.Trainer._load_from_checkpoint (overridden)", "tune_dynsdpb/trainer.py",
        "def _load_from_checkpoint(self, resume_from_checkpoint, model=None)",
        "restores the soft-target cache and the schedule from the resolved checkpoint folder "
        "(resume_from_checkpoint=True already resolved), once per train(); public route: override train() "
        "and resolve the folder with transformers.trainer_utils.get_last_checkpoint",
        "transformers", "5.25.0"),
    PrivateUse(
        "transformers.Trainer._remove_unused_columns", "tune_dynsdpb/trainer.py",
        'self._remove_unused_columns(dataset, description="training")',
        "get_train_dataloader is replaced (the previous-batch sampler); the columns the model's forward does "
        "not take must go exactly as the stock loader drops them (remove_unused_columns, label names, peft)",
        "transformers", "5.25.0"),
    PrivateUse(
        "transformers.Trainer._get_collator_with_removed_columns", "tune_dynsdpb/trainer.py",
        'self._get_collator_with_removed_columns(collator, description="training")',
        "the same, for datasets that are not a datasets.Dataset (columns removed in the collator)",
        "transformers", "5.25.0"),
    PrivateUse(
        "ray.train.v2 TrainController.abort (actor method of Train V2's internal controller)",
        "trainables/distributed.py", "controller.abort.remote()",
        "stops the TorchTrainer.fit() of a DDP trial that Tune stopped (ASHA, a reused actor); Ray Train has no "
        "public way to stop a running fit() from another thread (ray.kill of the controller would skip the "
        "workers' shutdown)",
        "ray", "2.60.0"),
    PrivateUse(
        "ray.tune.search.optuna.OptunaSearch._storage", "tune_dynsdpb/searching.py",
        'getattr(s, "_storage", None)',
        "a restored sweep (Tuner.restore) re-points its studies at the new folder's journal; OptunaSearch takes "
        "its storage only when built, and a restored searcher is unpickled, not built",
        "ray", "2.60.0"),
    PrivateUse(
        "optuna.storages.JournalStorage._backend", "tune_dynsdpb/searching.py",
        "journal._backend = JournalFileBackend(path)",
        "the same re-pointing: a JournalStorage's backend is fixed at construction, and the studies, their "
        "trials and Tune's trial map inside the unpickled searcher all hold that storage object",
        "optuna", "5.1.0"),
    PrivateUse(
        "optuna.storages.journal.JournalFileBackend._file_path", "tune_dynsdpb/searching.py",
        'getattr(backend, "_file_path", path)',
        "tells whether a restored study already writes to this folder's journal (no public accessor)",
        "optuna", "5.1.0"),
    PrivateUse(
        "ray.tune.search.optuna.OptunaSearch, pickled with its internals", "tune_dynsdpb/searching.py",
        "pickle.dump(self.__dict__, f)",
        "RoundRobinSearcher.save (Tune's Searcher.save) pickles its per-group OptunaSearch objects whole "
        "(their _ot_study, _ot_trials, sampler); OptunaSearch.save pickles the same internals, so a saved sweep "
        "restores only under the Ray and Optuna versions that wrote it",
        "ray", "2.60.0"),
)


__all__ = ["PrivateUse", "USES"]
