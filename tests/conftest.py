import os

import pytest

# tests never download anything and never need a GPU
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SMALL = [
    "market.n_users=300", "market.n_items=200", "market.n_providers=20",
    "market.new_items_per_round=3", "market.new_users_per_round=4",
    "agents.users.activity=0.3", "run.rounds=6", "run.progress=false", "run.eval_users=32",
]


@pytest.fixture
def small_overrides():
    """Overrides that make any scenario small enough to run in about a second."""
    return list(SMALL)
