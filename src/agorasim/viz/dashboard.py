"""The dashboard page: Mesa's ``SolaraViz`` over a ``LiveMarket`` or a ``RunReplay``.

The series over rounds are Mesa plot components (``make_plot_component``, matplotlib backend)
over the model's ``DataCollector``; the Lorenz curve, the exposure of the popularity groups
against their target and the followed user's slate are Solara components of our own that
redraw on Mesa's update counter, as Mesa's own components do. The controls are Mesa model
parameters: change one, press Reset, and ``SolaraViz`` builds the model again with it.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import solara
from matplotlib.figure import Figure
from mesa.visualization import Slider, SolaraViz, make_plot_component
from mesa.visualization.utils import update_counter

from agorasim.viz.models import SERIES, LiveMarket, RunReplay, live_config

FIGURE_SIZE = (5.0, 3.4)  # inches; a panel of the page's grid
SEED_MAX = 99


def _titled(title: str, ylabel: str | None = None, ylim: tuple[float, float] | None = None) -> Callable:
    """A Mesa plot's post-processing: title, y label and range (Mesa labels the x axis "Step")."""
    def post_process(ax):
        ax.set_title(title)
        if ylabel:
            ax.set_ylabel(ylabel)
        if ylim:
            ax.set_ylim(*ylim)
        ax.figure.set_size_inches(*FIGURE_SIZE)
    return post_process


def _figure() -> tuple[Figure, object]:
    fig = Figure(figsize=FIGURE_SIZE)
    return fig, fig.subplots()


@solara.component
def LorenzCurve(model):
    """Lorenz curve of exposure over the ledger window (alive items), against equality."""
    update_counter.get()
    fig, ax = _figure()
    curve = model.lorenz()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="equality")
    if curve is not None:
        rnd, population, shares = curve
        ax.plot(population, shares, color="C3", label=f"round {rnd}")
        ax.fill_between(population, shares, population, color="C3", alpha=0.15)
    ax.set(title="Lorenz curve of exposure", xlabel="share of items (least exposed first)",
           ylabel="share of exposure", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")
    solara.FigureMatplotlib(fig, format="png", bbox_inches="tight")


@solara.component
def GroupExposure(model):
    """Exposure share of every popularity group (0 = most popular) against the platform's target."""
    update_counter.get()
    fig, ax = _figure()
    groups = model.groups()
    if groups is not None:
        rnd, share, target = groups
        x = np.arange(len(share))
        ax.bar(x - 0.2, share, width=0.4, label="exposure share", color="C0")
        ax.bar(x + 0.2, target, width=0.4, label="target share", color="C2")
        ax.set_xticks(x)
        ax.set_title(f"exposure by popularity group, round {rnd}")
        ax.legend(loc="upper right")
    else:
        ax.set_title("exposure by popularity group")
    ax.set(xlabel="popularity group (0 = most popular)", ylabel="share of exposure")
    solara.FigureMatplotlib(fig, format="png", bbox_inches="tight")


SLATE_HEADER = ("slot", "item", "promotion claims", "unsupported", "pull", "feedback")


def slate_table(slate: dict | None, user: int) -> tuple[str, list[tuple[str, ...]]]:
    """The followed user's slate as a caption and table rows: item, promotion shown, feedback given."""
    if slate is None:
        return f"User {user} has not visited yet (or is not among the users events.jsonl records).", []
    rows = []
    for slot, s in enumerate(slate["slots"]):
        claims = "—" if s["claimed"] is None else (", ".join(s["claimed"]) or "none")
        unsupported = "—" if s["unsupported"] is None else (", ".join(s["unsupported"]) or "none")
        pull = "—" if s["hype"] is None else f"{s['hype']:.2f}"
        said = f"clicked, rated {s['rating']:.1f}/10 ({s['reason']})" if s["click"] else s["reason"].replace("_", " ")
        rows.append((str(slot), f"{s['item']} {s['title']}".strip(), claims, unsupported, pull, said))
    return f"User {slate['user']}, round {slate['round']}", rows


def _html_table(rows: list[tuple[str, ...]]) -> str:
    cell = "padding:2px 8px;text-align:left;border-bottom:1px solid #ddd"
    head = "".join(f'<th style="{cell}">{html.escape(h)}</th>' for h in SLATE_HEADER)
    body = "".join("<tr>" + "".join(f'<td style="{cell}">{html.escape(c)}</td>' for c in row) + "</tr>" for row in rows)
    return f'<table style="border-collapse:collapse;font-size:13px"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


@solara.component
def FollowedSlate(model):
    """One user's last slate, the promotions shown with it and the feedback the user gave (a plain
    HTML table: solara's Markdown would fetch its math fonts from a CDN)."""
    update_counter.get()
    caption, rows = slate_table(model.followed_slate(), model.followed_user)
    with solara.Card("Followed user's slate"):
        solara.Text(caption, style={"font-weight": "bold"})
        if rows:
            solara.HTML(tag="div", unsafe_innerHTML=_html_table(rows))


def components() -> list:
    """The page's panels, in grid order (two a row)."""
    return [
        make_plot_component({"exposure Gini": "C3", "coverage": "C0", "tail share": "C2"},
                            post_process=_titled("exposure concentration", "share", (0, 1))),
        make_plot_component({"utility": "C1"}, post_process=_titled("user utility of the slates")),
        LorenzCurve,
        GroupExposure,
        make_plot_component({"fairness weight": "C4"}, post_process=_titled("platform fairness weight")),
        FollowedSlate,
    ]


@dataclass
class PageSpec:
    """What the page shows: a first model (built and checked by the command) and its controls."""

    model_class: type
    model_params: dict
    name: str
    first: object = None
    built: list = field(default_factory=list)

    def model(self):
        """The command's model for the first session; a fresh one for every later session."""
        if self.first is not None:
            model, self.first = self.first, None
            return model
        fixed = {k: (v["value"] if isinstance(v, dict) else v.value if isinstance(v, Slider) else v)
                 for k, v in self.model_params.items()}
        return self.model_class(**fixed)


_spec: PageSpec | None = None


def live_spec(scenario: str, overrides: list[str], seed: int | None = None) -> PageSpec:
    """The page of a scenario run live (its model built here: every problem is a UserInputError)."""
    from agorasim.platform import RERANKERS
    from agorasim.policy import POLICIES

    config = live_config(scenario, seed=seed, overrides=overrides)
    p = config.platform
    params = {
        "scenario": scenario,
        "overrides": tuple(overrides),
        "policy": {"type": "Select", "label": "policy", "value": config.policy.name, "values": list(POLICIES)},
        "reranker": {"type": "Select", "label": "re-ranker", "value": p.reranker, "values": list(RERANKERS)},
        "fairness_weight": Slider("fairness weight", value=float(p.fairness_weight), min=0.0,
                                  max=max(5.0, float(p.fairness_weight)), step=0.1),
        "seed": Slider("seed", value=int(config.run.seed), min=0, max=max(SEED_MAX, int(config.run.seed)), step=1),
        "user": Slider("followed user", value=0, min=0, max=max(1, config.market.n_users - 1), step=1),
    }
    model = LiveMarket(scenario=scenario, policy=config.policy.name, reranker=p.reranker,
                       fairness_weight=float(p.fairness_weight), seed=int(config.run.seed), user=0,
                       overrides=tuple(overrides))
    return PageSpec(LiveMarket, params, f"agorasim: {config.scenario} ({config.label}), live", model)


def replay_spec(run_dir: str) -> PageSpec:
    """The page of a run folder replayed round by round."""
    model = RunReplay(run_dir=run_dir)
    users = sorted({record["user_id"] for record in model.events}) or [model.followed_user]
    params = {"run_dir": run_dir,
              "user": {"type": "Select", "label": "followed user", "value": model.followed_user, "values": users}}
    return PageSpec(RunReplay, params, f"agorasim: replay of {model.run_dir.name}", model)


def set_page(spec: PageSpec) -> None:
    global _spec
    _spec = spec


@solara.component
def Page():
    """The Solara app: Mesa's SolaraViz over the configured model."""
    assert _spec is not None, "agorasim.viz.dashboard.set_page() is called before the server starts"
    model = solara.use_memo(_spec.model, [])
    SolaraViz(model, components=components(), model_params=_spec.model_params, name=_spec.name)


__all__ = ["Page", "PageSpec", "SERIES", "components", "live_spec", "replay_spec", "set_page", "slate_table"]
