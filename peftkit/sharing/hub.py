"""Share adapters: `peftkit push` a finished run to the Hugging Face Hub or to a local directory hub, and pull one
back by name (`peftkit predict user/name`, `model.adapter: user/name` in a recipe).

A pushed repo holds at its root what a user of plain peft expects there, so `PeftModel.from_pretrained(base,
"user/name")` works, plus what peftkit needs to use it again:

    adapter_config.json, adapter_model.safetensors (or the method's own format), tokenizer files
    peftkit.json        task, method, format, base model, labels
    recipe.yaml         the fully resolved recipe it was trained with
    metrics.json        per-split metrics, per-epoch history, counts
    README.md           the model card (YAML metadata + what was trained, how, and how well)
    training_curve.png  training loss and validation metric (needs matplotlib: the `bench` extra)

The local directory hub keeps the same files in DIR/<user>/<name>/<revision>/ (revision `main` unless one is
given), each revision written atomically; it serves offline use and tests. Pulling looks at a local run folder
first, then the local hub (--hub-dir or PEFTKIT_HUB_DIR), then the Hugging Face Hub (its cache included).
The Hub token is huggingface_hub's own (HF_TOKEN, or `hf auth login`): peftkit never reads, prints or stores it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from peftkit import atomic
from peftkit.errors import UserError, did_you_mean
from peftkit.methods import storage
from peftkit.run_folder import METRICS, RECIPE, adapter_folder, finished_adapter, finished_run
from peftkit.sharing import card

if TYPE_CHECKING:
    import torch
    from huggingface_hub.errors import HfHubHTTPError

    from peftkit.recipe import Recipe

log = logging.getLogger("peftkit")

HUB_DIR_ENV = "PEFTKIT_HUB_DIR"
DEFAULT_REVISION = "main"
LOGIN_FIX = "log in with `hf auth login` or set HF_TOKEN to a token with write access"


# --- names and folders ----------------------------------------------------------------------------------------


def parse_ref(ref: str) -> tuple[str, str]:
    """`user/name[@revision]` -> (repo id, revision), checked with huggingface_hub's own rules."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id, _, revision = str(ref).partition("@")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UserError(f"'{repo_id}' is not a repo id ({err}); use user/name or user/name@revision") from None
    if "/" not in repo_id:
        raise UserError(f"'{repo_id}' has no namespace; use user/name (your user or organisation name first)")
    return repo_id, revision or DEFAULT_REVISION


def resolve_run(ref: str | Path, hub_dir: Path | str | None = None) -> Path:
    """A finished run or pulled repo folder for `ref`: a local folder as given; else `user/name[@revision]` from
    the local hub (`hub_dir`, or PEFTKIT_HUB_DIR), else from the Hugging Face Hub (downloaded into its cache)."""
    path = Path(str(ref)).expanduser()
    if path.exists():
        return path
    try:
        repo_id, revision = parse_ref(str(ref))
    except UserError as err:
        raise UserError(f"{ref}: no such run folder, nor the name of a pushed adapter: {err}") from None
    hub_dir = hub_dir or os.environ.get(HUB_DIR_ENV)
    if hub_dir:
        local = Path(hub_dir) / repo_id / revision
        if local.is_dir():
            return local
    # a typo in a folder name (runs/sentimnt-lora) also reads as a repo id: the error names the folder first
    near = did_you_mean(path.name, [p.name for p in path.parent.iterdir()]) if path.parent.is_dir() else ""
    searched = f"no folder {ref}{near}" + (f", nothing in the local hub {hub_dir}" if hub_dir else "")
    folder = _download(repo_id, revision, searched=searched)
    if adapter_folder(folder) is None:
        raise UserError(
            f"{repo_id}@{revision} is not a peftkit adapter repo (no peftkit.json and recipe.yaml at its "
            "root); push one with `peftkit push RUN_DIR --repo user/name`"
        )
    return folder


def _download(repo_id: str, revision: str, searched: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except RevisionNotFoundError:
        raise UserError(
            f"{repo_id} has no revision '{revision}' on the Hugging Face Hub; check the name after @"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"{repo_id}: {searched}, and no such repo on the Hugging Face Hub (if it is private, "
            f"{LOGIN_FIX.replace('write', 'read')}); check the name"
        ) from None
    except LocalEntryNotFoundError:
        raise UserError(
            f"{repo_id}: {searched}, the Hugging Face Hub is unreachable (offline, or HF_HUB_OFFLINE "
            "is set) and no copy is cached; connect and retry, or pull from a local hub with --hub-dir "
            f"DIR or {HUB_DIR_ENV}"
        ) from None
    except HfHubHTTPError as err:
        raise _http_error(err, repo_id) from None


# --- the folder a push uploads --------------------------------------------------------------------------------


def build_folder(run_dir: Path, out: Path, repo_id: str) -> list[str]:
    """Write the repo's files into `out`; returns notes for the user (e.g. a plot skipped)."""
    run_dir, out = Path(run_dir), Path(out)
    adapter, recipe, info = finished_run(run_dir)
    for item in adapter.iterdir():  # the adapter's own README.md (peft's empty card) is replaced below
        if item.is_file() and item.name != "README.md":
            shutil.copy2(item, out / item.name)
    for name in (RECIPE, METRICS):
        shutil.copy2(run_dir / name, out / name)
    notes = []
    if (run_dir / "combine.json").is_file():  # `peftkit combine`: no training, so no curve
        notes.append("training_curve.png skipped: a combination of adapters has no training of its own")
    elif not card.training_curve(run_dir, out / "training_curve.png", recipe.eval.metric_for_best):
        notes.append("training_curve.png skipped: matplotlib is not installed (pip install 'peftkit[bench]')")
    metrics = json.loads((run_dir / METRICS).read_text(encoding="utf-8"))
    recipe_text = (run_dir / RECIPE).read_text(encoding="utf-8")
    card.model_card(recipe, info, metrics, recipe_text, repo_id, plot=(out / "training_curve.png").is_file()).save(
        out / "README.md"
    )
    return notes


def listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(f.relative_to(folder)), f.stat().st_size) for f in Path(folder).rglob("*") if f.is_file())


# --- push -----------------------------------------------------------------------------------------------------


def push(
    run_dir: Path,
    repo: str,
    private: bool = False,
    revision: str | None = None,
    hub_dir: Path | None = None,
    dry_run: bool = False,
    message: str | None = None,
) -> dict:
    """Upload a finished run as `repo` (to the local hub `hub_dir` if given); `dry_run` only lists what would go.
    Returns {"destination", "files": [(name, bytes)], "notes"}."""
    repo_id, at = parse_ref(repo)
    revision = revision or at
    finished_run(run_dir)
    message = message or f"peftkit push {Path(run_dir).name}"
    if hub_dir is not None:
        target = Path(hub_dir) / repo_id / revision
        if dry_run:
            return {"destination": str(target), **_dry(run_dir, repo_id)}
        if private:
            log.info("--private: a local directory hub has no visibility; the folder's permissions apply")
        with atomic.building(target, overwrite=True) as tmp:  # a revision appears whole or not at all
            notes = build_folder(run_dir, tmp, repo_id)
        return {"destination": str(target), "files": listing(target), "notes": notes}
    from huggingface_hub import HfApi

    api = HfApi()
    destination = f"{api.endpoint}/{repo_id}" + ("" if revision == DEFAULT_REVISION else f"/tree/{revision}")
    if dry_run:
        return {"destination": destination, **_dry(run_dir, repo_id)}
    with tempfile.TemporaryDirectory(prefix="peftkit-push-") as tmp:
        notes = build_folder(run_dir, Path(tmp), repo_id)
        files = listing(Path(tmp))
        with _hub_errors(repo_id, api.endpoint):
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision != DEFAULT_REVISION:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision, commit_message=message)
    return {"destination": destination, "files": files, "notes": notes, "commit": getattr(commit, "oid", None)}


def _dry(run_dir: Path, repo_id: str) -> dict:
    """What a push would upload, built in a temporary folder that is removed again."""
    with tempfile.TemporaryDirectory(prefix="peftkit-push-") as tmp:
        notes = build_folder(run_dir, Path(tmp), repo_id)
        return {"files": listing(Path(tmp)), "notes": notes}


class _hub_errors:
    """The Hub's and the network's failures as UserErrors naming the fix (the token never appears in them)."""

    def __init__(self, repo_id: str, endpoint: str) -> None:
        self.repo_id, self.endpoint = repo_id, endpoint

    def __enter__(self) -> _hub_errors:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]:
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        if err is None:
            return False
        if isinstance(err, OfflineModeIsEnabled):
            raise UserError(
                f"cannot push {self.repo_id}: HF_HUB_OFFLINE is set; unset it, or push to a local "
                "directory hub with --hub-dir DIR"
            ) from None
        if _network_error(err):
            raise UserError(
                f"cannot reach the Hugging Face Hub at {self.endpoint} ({type(err).__name__}: {err}); "
                "check your connection (and HF_ENDPOINT, proxies), or push to a local directory hub "
                "with --hub-dir DIR"
            ) from None
        if isinstance(err, HfHubHTTPError):
            raise _http_error(err, self.repo_id) from None
        if isinstance(err, ValueError):  # huggingface_hub's own checks, e.g. the Hub rejecting the card's metadata
            raise UserError(f"the Hugging Face Hub rejected the push to {self.repo_id}: {err}") from None
        return False


def _network_error(err: BaseException) -> bool:
    """A connection that failed (refused, DNS, timeout): huggingface_hub raises its HTTP client's TransportError
    (httpx's, or httpx2's in huggingface_hub 2.x), matched by name so that either client version works."""
    return any(
        c.__name__ == "TransportError" and c.__module__.split(".")[0] in ("httpx", "httpx2") for c in type(err).__mro__
    )


def _http_error(err: HfHubHTTPError, repo_id: str) -> UserError:
    status = err.response.status_code if getattr(err, "response", None) is not None else None
    if status == 401:
        return UserError(f"the Hugging Face Hub refused the credentials (401) for {repo_id}: {LOGIN_FIX}")
    if status == 403:
        return UserError(
            f"no write access to {repo_id} (403): the repo or its namespace belongs to someone else, "
            "or your token is read-only; push to a repo under your own name (`hf auth whoami` shows "
            f"it) or {LOGIN_FIX}"
        )
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return UserError(f"the Hugging Face Hub answered {status} for {repo_id}: {first}")


# --- starting a run from a published adapter ------------------------------------------------------------------


def starting_adapter(recipe: Recipe, labels: list[str] | None) -> Path:
    """The adapter folder `model.adapter` names, checked against the recipe (before any model is loaded)."""
    ref = recipe.model.adapter
    folder = resolve_run(ref)
    try:
        adapter, theirs, info = finished_adapter(folder)
    except UserError as err:
        raise UserError(f"model.adapter: {err}") from None
    problems = []
    if info["base_model"] != recipe.model.name:
        problems.append(f"its base model is {info['base_model']}, this recipe's model.name is {recipe.model.name}")
    if theirs.task.type != recipe.task.type:
        problems.append(f"its task is {theirs.task.type}, this recipe's is {recipe.task.type}")
    if info.get("labels") != labels:
        problems.append(f"its labels are {info.get('labels')}, this recipe's data gives {labels}")
    mine, their_method = recipe.method.model_dump(mode="json"), theirs.method.model_dump(mode="json")
    if mine != their_method:
        differ = sorted(k for k in mine.keys() | their_method.keys() if mine.get(k) != their_method.get(k))
        problems.append(
            "the method sections differ in "
            + ", ".join(f"method.{k} ({their_method.get(k)!r} there, {mine.get(k)!r} here)" for k in differ)
        )
    if their_method.get("init") in ("pissa", "olora"):
        problems.append(
            f"it was trained with method.init {their_method['init']}, which moves the base weights; its "
            "saved adapter is converted to a rank-2r LoRA on the original base, so it cannot be loaded "
            "into a freshly initialised one"
        )
    if their_method.get("name") == "adalora":
        problems.append(
            "it is an AdaLoRA adapter, saved with the ranks its pruning left, which a fresh AdaLoRA model does not have"
        )
    if problems:
        raise UserError(
            f"model.adapter: {ref} cannot start this run: "
            + "; ".join(problems)
            + f". Make this recipe's sections match the adapter's recipe ({folder / 'recipe.yaml'})"
        )
    return adapter


def load_start(model: torch.nn.Module, adapter: Path, ref: str) -> None:
    """Copy the checked adapter's trained tensors into `model` (the recipe's method just applied)."""
    try:
        storage.load_weights(model, adapter)
    except (ValueError, RuntimeError) as err:
        raise UserError(f"model.adapter: {ref} does not fit this model: {err}") from None
    log.info("model.adapter: starting from the trained adapter %s", ref)
