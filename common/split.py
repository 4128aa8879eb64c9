"""Whether a site's class counts allow a train / held-out split under the release rule (pure Python).

A site splits whole release blocks (common.release): each class is cut into blocks of ``block`` to
2 x ``block`` - 1 patients, and ``held_out_blocks`` of them are held out. So each class needs at least two
blocks, and the training cases of each class and the held-out cases need at least k (the run's minimum,
which may be above the block size).
"""

from __future__ import annotations

from common.release import held_out_blocks


def eligibility_problem(n_hgg: int, n_bm: int, k: int, test_fraction: float, block: int,
                        folds: int = 0) -> str | None:
    """Why a site with these class counts cannot take part, or None (from counts alone: the fewest cases
    the blocks can give each part). ``folds`` > 0: cross-validation, each fold one or more whole blocks of
    each class."""
    if folds:
        if min(n_hgg, n_bm) < folds * block:
            return (f"{n_hgg} HGG and {n_bm} BM cases; {folds}-fold cross-validation needs at least "
                    f"{folds * block} per class ({folds} release blocks of k = {block}: one per fold); lower cv-folds")
        blocks = {name: n // block for name, n in (("HGG", n_hgg), ("BM", n_bm))}
        train = {name: (b - -(-b // folds)) * block for name, b in blocks.items()}  # without its largest fold
        return split_problem(train["HGG"], train["BM"], sum(b // folds for b in blocks.values()) * block, 0, k)
    if min(n_hgg, n_bm) < 2 * block:
        return (f"{n_hgg} HGG and {n_bm} BM cases; each class needs at least {2 * block} (two release blocks of "
                f"k = {block}: one for training, one held out)")
    least = {}
    for name, n in (("HGG", n_hgg), ("BM", n_bm)):
        blocks = n // block
        held = held_out_blocks(blocks, test_fraction)
        least[name] = ((blocks - held) * block, held * block)
    return split_problem(least["HGG"][0], least["BM"][0], least["HGG"][1], least["BM"][1], k)


def cv_tag(repeat: int, fold: int) -> str:
    """The cohort tag of cross-validation fold ``fold`` of repeat ``repeat`` (both sides use it)."""
    return f"cv:{repeat}:{fold}"


def parse_cv_tag(tag: str) -> tuple[int, int] | None:
    """(repeat, fold) of a cross-validation cohort tag; None for any other cohort."""
    parts = tag.split(":")
    if len(parts) != 3 or parts[0] != "cv" or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return int(parts[1]), int(parts[2])


def split_problem(train_hgg: int, train_bm: int, test_hgg: int, test_bm: int, k: int) -> str | None:
    """Why this split cannot be used (a part with fewer than k cases), or None."""
    if min(train_hgg, train_bm) < k or test_hgg + test_bm < k:
        return (f"the held-out split leaves {train_hgg} HGG + {train_bm} BM training cases and "
                f"{test_hgg + test_bm} held-out; each training class and the held-out split need at least {k}")
    return None
