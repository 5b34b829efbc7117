"""The report: PNG figures and HTML pages over published latent tables. Matplotlib (Agg), no Ray.

    index = write_report("outputs/latents", "outputs/report")          # index.html (+ dynamics.html)
    page = write_comparison("outputs/latents-a", "outputs/latents-b", "outputs/report")  # comparison.html
    page = write_ood("outputs/latents-fashion-mnist", "outputs/latents-mnist-by-fashion", "outputs/ood")  # ood.html

index.html: reconstructions, prior samples, the latent space, l_i per class, the highest-loss
images, diagnostics (active units and KL per dimension, totals with standard errors, the evidence
gap per class, class-relative outliers), the training curves and the lineage. A table of several
checkpoints of one run (an `epoch` column) is shown there at one epoch (the last unless told), and
also gets dynamics.html: per-class mean l_i over the epochs, and the datapoints learned latest and
most forgotten with their own curves. comparison.html: two tables' l_i over the same datapoints,
class by class, and the largest changes with their images. ood.html: one checkpoint's l_i and -log p(x)
on its own kind of data (IN) and on other data (OUT), both distributions, AUROC, AUPR and FPR at 95%
TPR, and the images the scores mislead on. Image grids are titled by each datapoint's source.

The checkpoint and the shards default to the ones named in the table's _lineage.json; the dataset
(image shape, class names) is the shards' manifest's; labels are spoken of as "digit 3" for MNIST
and by name ("Ankle boot") where the dataset names its classes. The training curves come from the
metrics.jsonl of the run the checkpoint belongs to (<run_dir>/[kept/]epoch-NNNN/checkpoint.pt).
Same inputs give the same bytes: seeded choices, ordered queries, fixed colour limits, the default
style whatever the user's matplotlibrc, and no Software stamp in the PNGs.

The package: index.py writes index.html from figures.py's pictures, diagnostics.py's and training.py's
sections and shards.py's images; dynamics.py, comparison.py and ood.py write their pages; pages.py holds
the HTML around them all.
"""

from vaedist.report.comparison import COMPARISON_FIGURES, COMPARISON_PAGE, DELTAS_SQL, write_comparison
from vaedist.report.diagnostics import ACTIVE_THRESHOLD, DIAGNOSTIC_FIGURES
from vaedist.report.dynamics import DYNAMICS_FIGURES, DYNAMICS_PAGE, DYNAMICS_PER_GROUP, LEARNED_WITHIN_NATS
from vaedist.report.figures import DPI, GRID_COLUMNS
from vaedist.report.figures import _image_grid as _image_grid  # tests draw a grid directly (report._image_grid)
from vaedist.report.index import FIGURES, write_report
from vaedist.report.ood import OOD_FIGURES, OOD_PAGE, write_ood
from vaedist.report.training import TRAINING_FIGURE

__all__ = ["ACTIVE_THRESHOLD", "COMPARISON_FIGURES", "COMPARISON_PAGE", "DELTAS_SQL", "DIAGNOSTIC_FIGURES", "DPI",
           "DYNAMICS_FIGURES", "DYNAMICS_PAGE", "DYNAMICS_PER_GROUP", "FIGURES", "GRID_COLUMNS",
           "LEARNED_WITHIN_NATS", "OOD_FIGURES", "OOD_PAGE", "TRAINING_FIGURE", "write_comparison", "write_ood",
           "write_report"]
