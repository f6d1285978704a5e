"""Training ILPG, SVIP and SAGE from a benchmark's images, as ``python -m zslfast train`` runs it.

    RECIPES, Settings, SPECS                      each paper's recipe and its source; a run's settings; how each
                                                  model is built and fed (zslfast.training.recipes)
    train(settings, data, paths, words, ctx)      the run: validation run (gamma), test run, per-epoch metrics,
                                                  checkpoints, resuming (zslfast.training.loop)
    make_problems(data, val_holdout, seed)        the test and validation problems of an xlsa17 split
    cached_features(...)                          frozen backbones' features, extracted once, memory-mapped
                                                  (zslfast.training.cache)
    zslfast.training.runfolder                    the run folder's files, written atomically
"""

from .cache import cached_features
from .loop import Problem, SetupError, make_problems, train
from .recipes import RECIPES, SPECS, Recipe, Settings

__all__ = ["RECIPES", "SPECS", "Problem", "Recipe", "SetupError", "Settings", "cached_features", "make_problems",
           "train"]
