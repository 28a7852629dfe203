"""population.worker_setup: an organism's actor imports its Trainable without the driver's parts of
Tune, and whatever later needs them gets the real, complete modules. Each case runs in a fresh
interpreter (deferring edits ``sys.modules``)."""

import subprocess
import sys
import textwrap


def run_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_the_trainable_imports_without_tune_init_ray_data_or_pandas():
    out = run_python("""
        import sys
        from population import worker_setup
        assert worker_setup.defer() == ["pandas", "ray.data", "ray.tune"]
        import population.trainable
        from ray.tune.trainable import Trainable
        assert issubclass(population.trainable.OrganismTrainable, Trainable)
        for name in worker_setup.DEFERRED:
            assert isinstance(sys.modules[name], worker_setup.DeferredModule), name
        # Neither pandas' compiled core nor Ray Data's datasets nor the Tuner ran.
        heavy = [m for m in ("pandas._libs.lib", "ray.data.dataset", "ray.tune.tuner") if m in sys.modules]
        assert not heavy, heavy
        # Checkpoint storage still has what it needs.
        assert "pyarrow.fs" in sys.modules
        print("ok")
    """)
    assert out.strip() == "ok"


def test_a_deferred_package_loads_whole_on_first_use():
    out = run_python("""
        import pickle, sys
        from population import worker_setup
        worker_setup.defer()
        import population.trainable
        import ray
        # A name Tune's __init__ takes from one submodule comes from that submodule alone: as a
        # Tune submodule imports it, and as a restore unpickles the ray.tune.Checkpoint it is sent.
        from ray.tune import CheckpointConfig
        checkpoint_cls = pickle.loads(b"cray.tune\\nCheckpoint\\n.")
        from ray.tune.trainable.trainable_fn_utils import Checkpoint
        assert checkpoint_cls is Checkpoint
        assert type(sys.modules["ray.tune"]) is worker_setup.DeferredModule
        # Anything else runs the real package, which then answers for the placeholder too.
        from ray import tune
        placeholder = tune
        assert "Tuner" in tune.__all__
        assert type(sys.modules["ray.tune"]) is not worker_setup.DeferredModule
        assert ray.tune is sys.modules["ray.tune"] is not placeholder
        assert placeholder.Tuner is ray.tune.Tuner and ray.tune.Tuner.__module__ == "ray.tune.tuner"
        assert ray.tune.CheckpointConfig is CheckpointConfig
        # Submodules imported before it loaded are still its attributes.
        assert ray.tune.trainable is sys.modules["ray.tune.trainable"]
        # Ray Data and pandas load whole on their first use.
        assert ray.data.Dataset.__module__ == "ray.data.dataset"
        import pandas
        assert pandas.DataFrame({"a": [1, 2]})["a"].sum() == 3
        assert not any(type(sys.modules[name]) is worker_setup.DeferredModule for name in worker_setup.DEFERRED)
        print("ok")
    """)
    assert out.strip() == "ok"


def test_nothing_already_imported_is_deferred():
    out = run_python("""
        import sys
        import pandas
        from population import worker_setup
        assert worker_setup.defer() == ["ray.data", "ray.tune"]
        assert sys.modules["pandas"] is pandas
        print("ok")
    """)
    assert out.strip() == "ok"


def test_a_submodule_of_a_deferred_package_imports_after_its_package():
    """pandas' compiled modules need pandas/__init__.py to have run: a submodule imported while
    pandas is deferred runs the package first, and keeps its own spec."""
    out = run_python("""
        import sys
        from population import worker_setup
        worker_setup.defer()
        from pandas.api.types import is_numeric_dtype
        import pandas, pandas.api.types
        assert type(sys.modules["pandas"]) is not worker_setup.DeferredModule
        assert pandas.api.types.is_numeric_dtype is is_numeric_dtype
        for module in (pandas.api, pandas.api.types):
            assert module.__spec__.origin == module.__file__ and module.__spec__.name == module.__name__
        assert is_numeric_dtype(pandas.Series([1.5]))
        print("ok")
    """)
    assert out.strip() == "ok"


def test_a_deferred_package_pickles_by_name_and_a_failed_load_can_be_retried():
    out = run_python("""
        import importlib.abc, sys
        from population import worker_setup
        worker_setup.defer()
        import population.trainable
        import pandas, ray, ray.cloudpickle as cloudpickle
        # Ray pickles functions with cloudpickle, which pickles a module by name: a placeholder too.
        uses_pandas = lambda: pandas
        assert cloudpickle.loads(cloudpickle.dumps(uses_pandas))() is sys.modules["pandas"]
        assert type(sys.modules["pandas"]) is worker_setup.DeferredModule
        # Loading all of ray.tune fails halfway; the placeholder stays, and a retry loads it whole.
        placeholder = sys.modules["ray.tune"]

        class Fail(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "ray.tune.tuner":
                    raise ImportError("injected")

        sys.meta_path.insert(0, Fail())
        try:
            placeholder.__all__
            raise AssertionError("the injected failure did not happen")
        except ImportError as e:
            assert "injected" in str(e)
        assert sys.modules["ray.tune"] is placeholder
        sys.meta_path.pop(0)
        assert "Tuner" in placeholder.__all__
        assert ray.tune.schedulers is sys.modules["ray.tune.schedulers"]
        print("ok")
    """)
    assert out.strip() == "ok"
