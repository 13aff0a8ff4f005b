"""Everything a run will need, checked before any run folder exists.

``check_config`` resolves what pydantic cannot check alone (registered names, constructor
parameters, reward names, sweep settings, the slate against the catalogue, a memory estimate,
replay caches); ``check_output`` makes sure an output location can be written. Each problem is
one ``UserInputError`` line naming the field and what is allowed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from agorasim.config import Config
from agorasim.errors import UserInputError

# Resident bytes per user, per item and per (visitor, candidate) pair, measured with the
# popularity policy (maxrss of 1-round runs at 50k/200k users and 20k/80k items: 2.5 KB a user,
# 5.1 KB an item); the pair term counts the retrieval, scoring and re-ranking arrays.
BYTES_PER_USER = 2_500
BYTES_PER_ITEM = 5_000
BYTES_PER_PAIR = 64
BASE_BYTES = 400 * 2**20


def memory_estimate(config: Config) -> int:
    """A lower bound on the resident memory of the run's first round, in bytes."""
    m = config.market
    visitors = max(1, int(config.agents.users.activity * m.n_users) + m.new_users_per_round)
    return (BASE_BYTES + BYTES_PER_USER * m.n_users + BYTES_PER_ITEM * m.n_items
            + BYTES_PER_PAIR * visitors * max(config.platform.candidates, config.policy.pool_size))


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_config(config: Config) -> None:
    """Raise a one-line ``UserInputError`` for the first problem of ``config``."""
    from agorasim.env.market import build_policy, reranker_params
    from agorasim.platform import make_reranker
    from agorasim.rl import check_reward_names
    from agorasim.run.tracking import check_tracker

    try:  # names and parameters were checked with the config; this is what the constructors check
        build_policy(config)
    except (TypeError, ValueError) as error:
        raise UserInputError(f"config policy.params: {str(error).splitlines()[0]}") from None
    try:
        make_reranker(config.platform.reranker, **reranker_params(config))
    except (TypeError, ValueError) as error:
        raise UserInputError(f"config platform: {str(error).splitlines()[0]}") from None
    check_reward_names(config.rl.rewards)
    check_tracker(config.run.track)
    exp = config.experiment
    if exp.sweep_key:
        probe = config.model_dump(mode="json")
        for part in exp.sweep_key.split("."):
            if not isinstance(probe, dict) or part not in probe:
                raise UserInputError(f"config experiment.sweep_key: unknown key '{exp.sweep_key}'")
            probe = probe[part]
        if not exp.sweep_values:
            raise UserInputError(f"config experiment.sweep_values: give the values of "
                                 f"experiment.sweep_key={exp.sweep_key} (e.g. [0, 0.5, 1])")
    elif exp.sweep_values:
        raise UserInputError("config experiment.sweep_values: set experiment.sweep_key, the key they are values of")
    if config.platform.candidates < config.platform.k:
        raise UserInputError(f"config platform.candidates: must be >= platform.k ({config.platform.k}), "
                             f"got {config.platform.candidates}")
    if config.market.world == "synthetic" and config.market.n_items < config.platform.k:
        raise UserInputError(f"config market.n_items: a slate shows platform.k={config.platform.k} items, so the "
                             f"catalogue needs at least that many at round 0, got {config.market.n_items}")
    explanation = config.platform.explanation
    if config.platform.explain != "none" and explanation.n_aspects > config.market.dim:
        raise UserInputError(f"config platform.explanation.n_aspects: an explanation names aspects of the "
                             f"market.dim={config.market.dim} dimensions, got {explanation.n_aspects}")
    need, have = memory_estimate(config), physical_memory()
    if have is not None and need > have:
        raise UserInputError(
            f"config market.n_users={config.market.n_users}, market.n_items={config.market.n_items}, "
            f"platform.candidates={config.platform.candidates}: the run needs at least {_gib(need)}, "
            f"this machine has {_gib(have)}")
    check_engines(config)
    cache = config.agents.cache
    if cache.mode == "replay":
        if cache.path is None:
            raise UserInputError("config agents.cache.path: replay needs the response store of an earlier "
                                 "run (its llm_cache.jsonl)")
        if not Path(cache.path).is_file():
            raise UserInputError(f"config agents.cache.path: no such response store '{cache.path}'")


def check_output(path: str | Path, what: str, *, must_not_exist: bool = False) -> Path:
    """Make sure ``path`` is, or can become, a writable folder; nothing is left behind.

    Args:
        path: the folder.
        what: the option that named it, for the message (``--out``).
        must_not_exist: refuse an existing folder too (a report folder that would be overwritten).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserInputError(f"{what} {path}: is a file, not a folder")
    if must_not_exist and path.exists():
        raise UserInputError(f"{what} {path}: already exists; give a new folder")
    if (path / "config.yaml").is_file() and (path / "metrics.csv").exists():
        raise UserInputError(f"{what} {path}: is a run folder; give the folder that holds run folders "
                             f"(or --resume {path} to continue it)")
    if (path / "plan.yaml").is_file():
        raise UserInputError(f"{what} {path}: is an experiment folder; give the folder that holds them "
                             f"(or --resume {path} to continue it)")
    missing = []  # the folders a trial creation makes, removed again afterwards
    probe = path.absolute()
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    if not probe.is_dir():
        raise UserInputError(f"{what} {path}: {probe} is a file, not a folder")
    try:
        for folder in reversed(missing):
            folder.mkdir()
        with tempfile.TemporaryFile(dir=path.absolute()):
            pass
    except OSError as error:
        raise UserInputError(f"{what} {path}: cannot write there ({error.strerror})") from None
    finally:
        for folder in missing:
            if folder.is_dir():
                folder.rmdir()
    return path


def engines_used(config: Config) -> set[str]:
    """The text engines a run will call (user agents with a share of users, promotion writers)."""
    used = set()
    users = config.agents.users
    if users.backend not in ("utility", "fake") and users.llm_share > 0:
        used.add(users.backend)
    if config.agents.items.writer in ("hf", "vllm", "openai") and config.agents.items.promotion != "off":
        used.add(config.agents.items.writer)
    explanation = config.platform.explanation
    if config.platform.explain == "llm" and explanation.writer != "fake":
        used.add(explanation.writer)
    return used


def check_engines(config: Config, probe=None) -> None:
    """Model paths of local engines; for ``openai``, the URL and (unless ``agents.llm.check_server``
    is false) that the server answers ``GET {base_url}/models``. Replayed runs load no engine."""
    from urllib.parse import urlparse

    from agorasim.agents.engines.models import check_model

    llm = config.agents.llm
    if config.agents.cache.mode == "replay":
        return
    used = engines_used(config)
    if used & {"hf", "vllm"}:
        check_model(llm.model)
    if "openai" not in used:
        return
    url = urlparse(llm.base_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise UserInputError(f"config agents.llm.base_url: expected http(s)://host[:port]/v1, got {llm.base_url!r}")
    if llm.check_server:
        (probe or probe_server)(llm.base_url, llm.api_key_env)


def probe_server(base_url: str, api_key_env: str, timeout: float = 5.0) -> None:
    """One line unless an OpenAI-compatible server answers ``GET {base_url}/models``."""
    import httpx

    key = os.environ.get(api_key_env)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.get(base_url.rstrip("/") + "/models", headers=headers, timeout=timeout)
    except httpx.HTTPError as error:
        raise UserInputError(f"config agents.llm.base_url: no server answers at {base_url} ({type(error).__name__}); "
                             "start it, or set agents.llm.check_server=false to run on utility fallbacks") from None
    if response.status_code in (401, 403):
        raise UserInputError(f"config agents.llm.base_url: {base_url} refused the key in ${api_key_env} "
                             f"(HTTP {response.status_code})")
    if response.status_code >= 500:
        raise UserInputError(f"config agents.llm.base_url: {base_url} answers HTTP {response.status_code}")
