"""The ready-made analyses of latent tables, and their one registry. No Ray.

    from vaedist.analyses import ANALYSES, get_analysis, format_table
    print(format_table(get_analysis("loss-by-digit").function("outputs/latents"), "table"))
    for analysis in ANALYSES.values():
        print(analysis.name, "-", analysis.summary)

Each analysis is one SQL query kept as a module constant with DuckDB `$name` parameters (so docs
can quote it and a test can run it) and a function that checks its arguments, scopes the table to
one checkpoint and runs the query:

core.py       opening a table, running SQL, scoping to one checkpoint, errors (QueryError)
format.py     printing a result: aligned columns, CSV, JSON lines
one_table.py  loss by class, worst explained, gaps, neighbours, per-dimension diagnostics, totals, outliers
compare.py    two tables of the same datapoints, datapoint by datapoint
dynamics.py   a table of several checkpoints of one run (an epoch column)
ood.py        one checkpoint's tables of two data: the out-of-distribution readout
groups.py     a model of several latent groups (model.kind=hierarchical): the KL and active units per group

`vaedist query NAME` runs an analysis by its registered name; its options are the function's
keyword arguments the registry lists.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from vaedist.analyses.compare import COMPARE_BY_DIGIT_SQL, COMPARE_TOP_SQL, compare_by_digit, compare_top
from vaedist.analyses.core import (VIEW_A, VIEW_B, QueryError, connect, connect_pair, read_lineage, run_sql,
                                   table_epochs, table_files)
from vaedist.analyses.dynamics import (CURVES_SQL, DIGIT_CURVES_SQL, FORGOTTEN_SQL, LEARNED_LATE_SQL, curves,
                                       digit_curves, forgotten, learned_late)
from vaedist.analyses.format import format_table
from vaedist.analyses.groups import (ACTIVE_UNITS_BY_GROUP_SQL, KL_BY_GROUP_AND_CLASS_SQL, KL_BY_GROUP_OVER_EPOCHS_SQL,
                                     KL_BY_GROUP_SQL, active_units_by_group, kl_by_group, kl_by_group_and_class,
                                     kl_by_group_over_epochs)
from vaedist.analyses.ood import OOD_SQL, check_ood_pair, ood, pair_kind
from vaedist.analyses.one_table import (ACTIVE_UNITS_SQL, GAP_BY_DIGIT_SQL, KL_PER_DIM_SQL, LARGEST_GAPS_SQL,
                                        LOSS_BY_DIGIT_SQL, NEIGHBOURS_SQL, OUTLIERS_SQL, TOTALS_SQL,
                                        WORST_EXPLAINED_SQL, active_units, gap_by_digit, kl_per_dim, largest_gaps,
                                        loss_by_digit, neighbours, outliers, totals, worst_explained)

NEEDS = {
    "log_px": "log_px values: a table encoded with encode.num_samples_iw > 0",
    "epochs": "an epoch column: a table of several checkpoints of one run (vaedist encode --epochs)",
    "same-data": "a second table (against) of the same datapoints and binarisation (same manifest_hash)",
    "same-checkpoint": "a second table (against) encoded by the same checkpoint, of other data, "
                       "with the same num_samples_mc and num_samples_iw; both with a test split",
    "groups": "a kl_groups column: a table of a model of several latent groups (model.kind=hierarchical)",
}
"""What an analysis may need of its table(s), by the tag the registry uses."""


@dataclass(frozen=True)
class Analysis:
    """One ready-made analysis, as the registry lists it.

    name: as `vaedist query` takes it; function: what runs it (the table's path first); sql: its
    query, a module constant; summary: one line; needs: tags of NEEDS, what it needs of the
    table(s); options: the keyword arguments of the function that `vaedist query` fills.

    Example:
        >>> ANALYSES["gaps"].needs
        ('log_px',)
    """
    name: str
    function: Callable[..., Any]
    sql: str
    summary: str
    needs: tuple[str, ...] = ()
    options: tuple[str, ...] = ()

    @property
    def doc(self) -> str:
        """The function's docstring: what each column means and how the arguments act.

        Example:
            >>> print(ANALYSES["totals"].doc)
        """
        return inspect.getdoc(self.function) or ""

    @property
    def takes_against(self) -> bool:
        """Whether it reads two tables (the second one named `against`).

        Example:
            >>> ANALYSES["compare"].takes_against
            True
        """
        return "same-data" in self.needs or "same-checkpoint" in self.needs

    def run(self, latents_dir: str, against: str | None = None, **options: Any) -> Any:
        """Run it on a table with the options it takes, dropping the others.

        against: the second table of a two-table analysis. Dropping the options an analysis does
        not take lets one command line serve every analysis.

        Example:
            >>> get_analysis("worst").run("outputs/latents", k=5, space="mu")
        """
        kwargs = {k: v for k, v in options.items() if k in self.options}
        if self.takes_against:
            if against is None:
                need = next(n for n in self.needs if n in ("same-data", "same-checkpoint"))
                raise QueryError(f"{self.name} needs a second table, against: {NEEDS[need]}")
            return self.function(latents_dir, against, **kwargs)
        return self.function(latents_dir, **kwargs)


_ONE = ("split", "epoch")
_LIST = [
    Analysis("loss-by-digit", loss_by_digit, LOSS_BY_DIGIT_SQL,
             "Per class: count and l_i's mean and 10/50/90th percentiles, mean recon_nll, kl and gap.", (), _ONE),
    Analysis("worst", worst_explained, WORST_EXPLAINED_SQL,
             "The k datapoints with the highest l_i.", (), ("k", *_ONE)),
    Analysis("gaps", largest_gaps, LARGEST_GAPS_SQL,
             "The k datapoints with the largest gap log p(x) + l_i, the estimated KL(q(z|x) || p(z|x)).",
             ("log_px",), ("k", *_ONE)),
    Analysis("neighbours", neighbours, NEIGHBOURS_SQL,
             "The k datapoints nearest to one key in mu or z.", (), ("key", "k", "space", "epoch")),
    Analysis("active-units", active_units, ACTIVE_UNITS_SQL,
             "Per latent dimension: the variance of mu_d over datapoints and whether it is active.",
             (), ("threshold", *_ONE)),
    Analysis("kl-per-dim", kl_per_dim, KL_PER_DIM_SQL,
             "Per latent dimension: the mean KL(q(z_d|x) || N(0, 1)) and its share of the total.", (), _ONE),
    Analysis("totals", totals, TOTALS_SQL,
             "Per split: mean l_i, -log p(x) and gap with standard errors, and bits per dimension.", (), _ONE),
    Analysis("gap-by-digit", gap_by_digit, GAP_BY_DIGIT_SQL,
             "Per class: the mean evidence gap log p(x) + l_i with its standard error.", ("log_px",), _ONE),
    Analysis("outliers", outliers, OUTLIERS_SQL,
             "The k datapoints whose l_i lies furthest above their own class's (a z-score).", (), ("k", *_ONE)),
    Analysis("compare", compare_by_digit, COMPARE_BY_DIGIT_SQL,
             "Per class: the mean of delta = l_i(A) - l_i(B) over the same datapoints, paired standard error.",
             ("same-data",), (*_ONE, "against_epoch")),
    Analysis("compare-top", compare_top, COMPARE_TOP_SQL,
             "The k largest improvements and regressions of l_i between two tables of the same datapoints.",
             ("same-data",), ("k", *_ONE, "against_epoch")),
    Analysis("ood", ood, OOD_SQL,
             "AUROC, AUPR and FPR at 95% TPR of l_i and -log p(x) for telling other data (OUT) from IN.",
             ("same-checkpoint",), ()),
    Analysis("curves", curves, CURVES_SQL,
             "Per-datapoint learning curves: l_i at every kept epoch for given keys or the k worst.",
             ("epochs",), ("keys", "k", "split")),
    Analysis("digit-curves", digit_curves, DIGIT_CURVES_SQL,
             "Per class and kept epoch: mean l_i with its standard error, recon_nll and kl.", ("epochs",), ("split",)),
    Analysis("learned-late", learned_late, LEARNED_LATE_SQL,
             "Datapoints whose l_i comes near its final value only after a given epoch.",
             ("epochs",), ("within", "after", "split", "k")),
    Analysis("forgotten", forgotten, FORGOTTEN_SQL,
             "Datapoints whose l_i rose by more than a given amount between kept epochs.",
             ("epochs",), ("by", "split", "k", "from_epoch", "to_epoch")),
    Analysis("kl-by-group", kl_by_group, KL_BY_GROUP_SQL,
             "Per split and latent group: the mean KL term with its standard error and its share of the KL.",
             ("groups",), _ONE),
    Analysis("kl-by-group-and-class", kl_by_group_and_class, KL_BY_GROUP_AND_CLASS_SQL,
             "Per class and latent group: the mean KL term and its share of the class's KL.", ("groups",), _ONE),
    Analysis("active-units-by-group", active_units_by_group, ACTIVE_UNITS_BY_GROUP_SQL,
             "Per latent group: its units and how many are active (variance of mu_d above threshold).",
             ("groups",), ("threshold", *_ONE)),
    Analysis("kl-by-group-over-epochs", kl_by_group_over_epochs, KL_BY_GROUP_OVER_EPOCHS_SQL,
             "Per kept epoch and latent group: the mean KL term and its share of the epoch's KL.",
             ("groups", "epochs"), ("split",)),
]
ANALYSES: dict[str, Analysis] = {analysis.name: analysis for analysis in _LIST}
"""Every ready-made analysis by name, in the order `vaedist query --help` lists them."""


def get_analysis(name: str) -> Analysis:
    """The analysis registered under `name`.

    An unknown name is a QueryError that lists the known ones (and the closest, for a typo).

    Example:
        >>> get_analysis("loss-by-digit").summary
        "Per class: count and l_i's mean and 10/50/90th percentiles, mean recon_nll, kl and gap."
    """
    if name in ANALYSES:
        return ANALYSES[name]
    close = difflib.get_close_matches(name, list(ANALYSES), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise QueryError(f"unknown analysis {name!r}: {hint}the analyses are {', '.join(ANALYSES)}. "
                     "For SQL over the view `latents`: vaedist query sql \"SELECT ...\"")


__all__ = [
    "ANALYSES", "NEEDS", "VIEW_A", "VIEW_B", "Analysis", "QueryError", "active_units", "active_units_by_group",
    "check_ood_pair", "compare_by_digit", "compare_top", "connect", "connect_pair", "curves", "digit_curves",
    "forgotten", "format_table", "gap_by_digit", "get_analysis", "kl_by_group", "kl_by_group_and_class",
    "kl_by_group_over_epochs", "kl_per_dim", "largest_gaps", "learned_late", "loss_by_digit", "neighbours",
    "ood", "outliers", "pair_kind", "read_lineage", "run_sql", "table_epochs", "table_files", "totals",
    "worst_explained",
]
