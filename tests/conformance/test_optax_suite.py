"""optax's own rmsprop tests, run against rmsprop_jax.

The optax wheel ships its test modules. This module imports the five that build
optax's RMSprop (``grep -l 'rmsprop\\|scale_by_rms' optax/**/*_test.py``, optax 0.2.8):

* ``optax/_src/alias_test.py``: ``AliasTest``, the common tests over
  ``_OPTIMIZERS_UNDER_TEST`` (two rmsprop entries: ``lr=5e-3`` and ``momentum=0.9``):
  optimization of a parabola / Rosenbrock in float32 and complex64, extra args,
  ``inject_hyperparams``, dtype preservation, state dtype stability, MultiSteps;
* ``optax/contrib/_common_test.py``: ``ContribTest``, the same kind of tests on
  ``mechanize(rmsprop)`` (``_BASE_OPTIMIZERS``, two rmsprop entries);
* ``optax/_src/float64_test.py``: mixed float32 / float64 leaves under x64
  (``rmsprop`` and ``scale_by_rms``);
* ``optax/_src/sharding_test.py``: abstract ``init`` and sharding-in-types stability on an
  8-device mesh (``rmsprop``);
* ``optax/_src/transform_test.py``: ``scale_by_rms`` (``test_scalers_rmsprop``,
  ``test_rms_match_adam``).

Every test case of theirs that builds rmsprop is re-run once per implementation of ours
(``IMPLEMENTATIONS``; for the ``scale_by_rms`` cases, ``SCALE_BY_RMS_IMPLEMENTATIONS``):

* ``presets_optax``: ``rj.presets.optax`` itself, optax's argument names;
* ``rmsprop``: ``rj.rmsprop`` (Keras' argument names) behind :func:`rmsprop_optax_names`,
  an adapter with ``optax.rmsprop``'s argument names and defaults (``learning_rate``
  annotated ``optax.ScalarOrSchedule``, as optax's);
* ``rmsprop_keras``: ``rj.rmsprop`` itself (optax's cases pass only ``learning_rate`` and
  ``momentum``, Keras' names too), in the tests that read the factory's signature only
  (``SIGNATURE_TESTS``: ``inject_hyperparams``, the learning-rate annotation);
* ``scale_by_rmsprop``: ``rj.scale_by_rmsprop`` (optax's convention: ``+g / d``, what
  ``optax.scale_by_rms`` returns), with optax's argument names (:func:`scale_by_rms_adapter`).

How. absl's ``parameterized`` expands each test into methods (``test_optimization100``)
whose closure holds the parameters and whose ``__wrapped__`` is the test body. For each
rmsprop case we add a method to a subclass of optax's own TestCase class (pytest collects
it as a unittest class: optax's ``setUp``, ``subTest`` and assertions) that calls optax's
test body with the same parameters and our optimizer swapped in:

* where the body looks the factory up by name (``getattr(alias, 'rmsprop')``,
  ``transform.scale_by_rms(...)``), that module attribute is patched during the test;
* where optax captured the factory or an instance at import (``float64_test.ALL_MODULES``
  holds ``alias.rmsprop``; ``sharding_test.OPTIMIZERS`` holds ``optax.rmsprop(1.0)``),
  that parameter is replaced by ours (our factory; our factory called with ``1.0``).

A case that skips itself for our implementation (``self.skipTest`` / ``SkipTest``) FAILS
here: every rmsprop test must run its body. Cases that do not apply to us are listed in
``EXCLUDED`` with the reason (reported as skipped with that reason); a case that fails
because our behaviour differs is a defect, never an exclusion.
``test_every_rmsprop_case_of_optax_is_run`` fails if optax's modules hold an rmsprop
case this module does not run (a newer optax), or none at all.

``RMSPROP_JAX_OPTAX_SUITE_CONTROL=1`` adds optax's own rmsprop / scale_by_rms as an
implementation (``optax_control``, ``optax_control_scale_by_rms``): each of its cases passes
with optax 0.2.8, which tells a defect of ours from a failure of optax's test or of this
adapter.

Sharding: ``sharding_test`` needs 8 devices (it sets ``XLA_FLAGS`` when imported, which
only works before JAX starts). With fewer devices in this process its cases run once, all
together, in a subprocess with ``--xla_force_host_platform_device_count=8`` (this file run
as a script), and each case here reports that run's outcome. The ``XLA_FLAGS`` that
importing ``sharding_test`` sets is undone so no other test of this process sees it. Its
sharding-in-types tests skip themselves when ``jax.__version__ < '0.7.2'``, a string
comparison that is true for jax 0.10.2; for our cases the ``jax`` they see has a
``__version__`` that compares as a version (:class:`_Version`), so their bodies run.

A missing optax test module (or one of its own imports: absl, scikit-learn, scipy) is an
import error of this module: a collection error, never a skip.
"""

import contextlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import unittest
import warnings
from unittest import mock

import jax
import jax.numpy as jnp
import optax

# optax's own test modules: an ImportError here is a collection error (fails the run).
from optax._src import alias, alias_test, float64_test, transform, transform_test
from optax.contrib import _common_test

import rmsprop_jax as rj

_xla_flags = os.environ.get("XLA_FLAGS")
with warnings.catch_warnings():
    # its module-level optax.noisy_sgd(1.0) warns "Specifying a key will be required"
    warnings.simplefilter("ignore", UserWarning)
    from optax._src import sharding_test  # sets XLA_FLAGS when imported: undone below

if _xla_flags is None:
    os.environ.pop("XLA_FLAGS", None)
else:
    os.environ["XLA_FLAGS"] = _xla_flags
del _xla_flags

SHARDING_DEVICES = 8  # sharding_test's mesh: jax.make_mesh((8,), ('x',))


class _Version(str):
    """A version string that compares as a version.

    ``sharding_test`` guards its sharding-in-types tests with ``if jax.__version__ <
    '0.7.2': self.skipTest(...)``, a STRING comparison: ``'0.10.2' < '0.7.2'``, so on
    jax 0.10 optax's own tests skip themselves. Its ``jax`` is replaced, for our cases
    only, by :class:`_JaxComparableVersion`, whose ``__version__`` is this: the same
    text, ordered numerically, so the guard means what it says.
    """

    @staticmethod
    def _key(text):
        return tuple(int(n) for n in re.findall(r"\d+", str(text).split("+")[0])[:3])

    def __lt__(self, other):
        return self._key(self) < self._key(other)

    def __le__(self, other):
        return self._key(self) <= self._key(other)

    def __gt__(self, other):
        return self._key(self) > self._key(other)

    def __ge__(self, other):
        return self._key(self) >= self._key(other)


class _JaxComparableVersion:
    """``jax`` with ``__version__`` a :class:`_Version` (for ``sharding_test`` only)."""

    __version__ = _Version(jax.__version__)

    def __getattr__(self, name):
        return getattr(jax, name)


_CHILD_ENV = "RMSPROP_JAX_OPTAX_SUITE_SHARDING_CHILD"


# --------------------------------------------------------------------------- adapters


def rmsprop_optax_names(
    learning_rate: optax.ScalarOrSchedule,
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    centered: bool = False,
    momentum: float | None = None,
    nesterov: bool = False,
    bias_correction: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """``rj.rmsprop`` (Keras' names) with ``optax.rmsprop``'s signature and defaults."""
    return rj.rmsprop(
        learning_rate=learning_rate,
        rho=decay,
        momentum=0.0 if momentum is None else momentum,
        epsilon=eps,
        centered=centered,
        nesterov=nesterov and momentum is not None,  # optax: no momentum, no nesterov
        eps_in_sqrt=eps_in_sqrt,
        initial_accumulator_value=initial_scale,
        bias_correction=bias_correction,
    )


def scale_by_rms_adapter(
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
) -> optax.GradientTransformation:
    """``optax.scale_by_rms``'s argument names onto ``rj.scale_by_rmsprop``."""
    return rj.scale_by_rmsprop(
        rho=decay,
        epsilon=eps,
        eps_in_sqrt=eps_in_sqrt,
        initial_accumulator_value=initial_scale,
        bias_correction=bias_correction,
    )


# name -> factory with optax.rmsprop's argument names
IMPLEMENTATIONS = {
    "presets_optax": rj.presets.optax,
    "rmsprop": rmsprop_optax_names,
    # optax's cases pass only learning_rate and momentum, Keras' names too: rj.rmsprop
    # itself, with Keras' defaults (momentum=0.0, epsilon=1e-7). Only in SIGNATURE_TESTS.
    "rmsprop_keras": rj.rmsprop,
}
# Tests that inspect the factory's signature (inject_hyperparams injects every numeric
# argument; the schedule test reads learning_rate's annotation). ``rmsprop_keras`` runs
# only these: elsewhere it would repeat the ``rmsprop`` cases' rj.rmsprop call with
# epsilon 1e-7 for 1e-8, at a third of this module's run time.
SIGNATURE_TESTS = (
    "test_optimizers_can_be_wrapped_in_inject_hyperparams",
    "test_optimizers_accept_learning_rate_schedule_if_type_annotated_as_such",
)
ONLY_IN = {"rmsprop_keras": SIGNATURE_TESTS}
# name -> factory with optax.scale_by_rms's argument names
SCALE_BY_RMS_IMPLEMENTATIONS = {
    "scale_by_rmsprop": scale_by_rms_adapter,
}

if os.environ.get("RMSPROP_JAX_OPTAX_SUITE_CONTROL"):
    # Debugging aid: optax's own rmsprop / scale_by_rms through the same machinery, to
    # tell a failure of optax's test (or of this adapter) from a defect of ours.
    IMPLEMENTATIONS["optax_control"] = alias.rmsprop
    SCALE_BY_RMS_IMPLEMENTATIONS["optax_control_scale_by_rms"] = transform.scale_by_rms

# "<generated class>::<generated method>" -> why that case of optax's does not apply to us.
EXCLUDED: dict[str, str] = {
    # Keras' signature has momentum=0.0, a number, so inject_hyperparams traces it and the
    # transform cannot know it stays 0: it keeps a momentum buffer, so that a momentum
    # changed later in state.hyperparams acts (a buffer-less state would ignore it silently).
    # The updates equal rj.rmsprop's (the test's other subtests pass); only the state holds
    # that buffer. optax.rmsprop's default is momentum=None, hence no buffer there; with
    # inject_hyperparams(rj.rmsprop, static_args=("momentum",)) the states are equal. The
    # same case passes for presets_optax (optax's signature) and for the `rmsprop` adapter.
    "OptaxAliasTest_rmsprop_keras::test_optimizers_can_be_wrapped_in_inject_hyperparams__lr0p005": (
        "rj.rmsprop's Keras default momentum=0.0 is traced by inject_hyperparams: the state "
        "keeps a momentum buffer so that a later momentum change acts (updates are equal)"
    ),
}


# --------------------------------------------------------------------------- discovery


def _absl_case(cls, name):
    """``(test body, parameters)`` of a test method; parameters ``None`` if not parameterized."""
    func = getattr(cls, name)
    code = getattr(func, "__code__", None)
    freevars = code.co_freevars if code is not None else ()
    if "testcase_params" not in freevars:
        return func, None
    cells = dict(zip(freevars, (c.cell_contents for c in func.__closure__)))
    body = getattr(func, "__wrapped__", None)
    if body is None or cells.get("test_method") is not body:
        raise AssertionError(
            f"{cls.__name__}.{name}: absl parameterized's generated methods changed shape "
            "(no __wrapped__ test body / testcase_params closure); update this adapter"
        )
    return body, cells["testcase_params"]


def _short(value) -> str:
    if isinstance(value, dict):
        return "_".join(
            f"{'lr' if k == 'learning_rate' else k}{_short(v)}" for k, v in value.items()
        )
    if callable(value) and getattr(value, "__name__", "").startswith("_setup_"):
        return value.__name__[len("_setup_") :]
    if isinstance(value, (type, jnp.dtype)):
        return jnp.dtype(value).name
    if isinstance(value, float):
        return format(value, "g")
    return str(value)


def _readable_name(body, params) -> str:
    """``test_optimization__lr0p005_momentum0p9__parabola__complex64``."""
    parts = []
    for key, value in params.items():
        if key in ("opt_name", "wrapper_kwargs") or value is None:
            continue
        parts.append(f"wrap{value}" if key == "wrap" else _short(value))
    suffix = re.sub(r"\W+", "_", "__".join(parts).replace(".", "p")).strip("_")
    return f"{body.__name__}__{suffix}" if suffix else body.__name__


def _is_rms(obj, sharding_instance) -> str | None:
    """What a parameter of optax's is: ``"rmsprop"``, ``"scale_by_rms"``, ``"instance"``."""
    if obj is alias.rmsprop:
        return "rmsprop"
    if obj is transform.scale_by_rms:
        return "scale_by_rms"
    if sharding_instance is not None and obj is sharding_instance:
        return "instance"
    return None


def _plain_test_uses_scale_by_rms(body) -> bool:
    try:
        return "scale_by_rms(" in inspect.getsource(body)
    except (OSError, TypeError):
        return False


def _case(name, readable, body, args, kind) -> dict:
    """One rmsprop case: optax's method ``name``, our method ``readable``, the test body,
    its parameters (dict, tuple or None) and ``kind``, how ours is swapped in:
    ``patch_rmsprop`` / ``patch_rms`` (patch ``alias.rmsprop`` / ``transform.scale_by_rms``),
    ``rmsprop`` / ``scale_by_rms`` (replace that factory in the parameters), ``instance``
    (replace sharding_test's ``optax.rmsprop(1.0)`` by ours)."""
    return {"name": name, "readable": readable, "body": body, "args": args, "kind": kind}


def _cases(cls, sharding_instance=None):
    """Every rmsprop case of ``cls``: dicts with name, body, params, how to swap ours in."""
    found = []
    for name in unittest.TestLoader().getTestCaseNames(cls):
        body, params = _absl_case(cls, name)
        if params is None:  # not parameterized
            if _plain_test_uses_scale_by_rms(body):
                found.append(_case(name, name, body, None, "patch_rms"))
            continue
        if isinstance(params, dict):
            if params.get("opt_name") == "rmsprop":
                readable = _readable_name(body, params)
                found.append(_case(name, readable, body, params, "patch_rmsprop"))
            continue
        kinds = [_is_rms(p, sharding_instance) for p in params]
        if any(kinds):
            (kind,) = {k for k in kinds if k}
            found.append(_case(name, name, body, tuple(params), kind))
    return found


def _uncovered(cls, cases, sharding_instance=None):
    """Test methods of ``cls`` that mention rmsprop yet are not in ``cases``."""
    covered = {c["name"] for c in cases}
    missing = []
    for name in unittest.TestLoader().getTestCaseNames(cls):
        body, params = _absl_case(cls, name)
        text = f"{name} {params!r}".lower()
        mentions = "rmsprop" in text or "scale_by_rms" in text
        mentions = mentions or (params is None and _plain_test_uses_scale_by_rms(body))
        if params is not None and not isinstance(params, dict):
            mentions = mentions or any(_is_rms(p, sharding_instance) for p in params)
        if mentions and name not in covered:
            missing.append(f"{cls.__name__}.{name}")
    return missing


# --------------------------------------------------------------------------- sharding child

_SHARDING_RESULTS = None


def _sharding_env() -> dict:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = (
        f"{flags.strip()} --xla_force_host_platform_device_count={SHARDING_DEVICES} "
        "--xla_cpu_collective_call_terminate_timeout_seconds=900"  # see _sharding_common
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env[_CHILD_ENV] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(rj.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _sharding_results() -> dict:
    """Outcomes of every sharding case, run once in a child process with 8 CPU devices."""
    global _SHARDING_RESULTS
    if _SHARDING_RESULTS is None:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "results.json")
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--sharding-json", out],
                env=_sharding_env(),
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            if proc.returncode != 0 or not os.path.exists(out):
                raise AssertionError(
                    f"sharding child process failed (rc {proc.returncode}):\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
                )
            with open(out) as f:
                _SHARDING_RESULTS = json.load(f)
    return _SHARDING_RESULTS


class _CollectingResult(unittest.TestResult):
    """``{"Class::method": [outcome, detail]}``, subtest failures included."""

    def __init__(self):
        super().__init__()
        self.outcomes = {}

    def _set(self, test, outcome, detail):
        key = f"{type(test).__name__}::{test._testMethodName}"
        old = self.outcomes.get(key)
        if old is None or old[0] == "passed":
            self.outcomes[key] = [outcome, detail]
        elif outcome != "passed":
            old[1] += "\n" + detail

    def addSuccess(self, test):
        super().addSuccess(test)
        self.outcomes.setdefault(f"{type(test).__name__}::{test._testMethodName}", ["passed", ""])

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._set(test, "failed", self._exc_info_to_string(err, test))

    def addError(self, test, err):
        super().addError(test, err)
        self._set(test, "failed", self._exc_info_to_string(err, test))

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._set(test, "skipped", reason)

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            self._set(test, "failed", f"{subtest}: {self._exc_info_to_string(err, test)}")


# --------------------------------------------------------------------------- generated classes


def _swap(args, kind, factory):
    if kind == "instance":
        return tuple(factory(1.0) if _is_rms(a, _SHARDING_INSTANCE) else a for a in args)
    return tuple(factory if _is_rms(a, None) else a for a in args)


def _make_method(case, impl_name, factory, cls_name, is_sharding):
    body, args, kind = case["body"], case["args"], case["kind"]

    def run_body(self):
        patches = []
        if kind == "patch_rmsprop":
            patches.append(mock.patch.object(alias, "rmsprop", factory))
        if kind == "patch_rms":
            patches.append(mock.patch.object(transform, "scale_by_rms", factory))
        if is_sharding:
            patches.append(mock.patch.object(sharding_test, "jax", _JaxComparableVersion()))
        x64 = jax.config.jax_enable_x64
        try:
            with contextlib.ExitStack() as stack:
                for p in patches:
                    stack.enter_context(p)
                if args is None:
                    body(self)
                elif isinstance(args, dict):
                    body(self, **args)
                else:
                    body(self, *_swap(args, kind, factory))
        except unittest.SkipTest as e:
            raise AssertionError(
                f"optax's test skipped itself for {impl_name}: {e}. Every rmsprop case must "
                "run: fix the cause, or list the case in EXCLUDED with its reason"
            ) from e
        finally:
            jax.config.update("jax_enable_x64", x64)  # float64_test leaves x64 on if it fails

    def method(self):
        if is_sharding and jax.device_count() < SHARDING_DEVICES and not os.environ.get(_CHILD_ENV):
            outcome, detail = _sharding_results()[f"{cls_name}::{case['readable']}"]
            if outcome == "skipped":
                self.fail(f"skipped in the {SHARDING_DEVICES}-device child process: {detail}")
            if outcome != "passed":
                self.fail(f"in the {SHARDING_DEVICES}-device child process:\n{detail}")
            return
        run_body(self)

    method.__name__ = case["readable"]
    method.__doc__ = f"optax {case['name']} with {impl_name}; parameters: {args!r}"
    key = f"{cls_name}::{case['readable']}"
    if key in EXCLUDED:
        method = unittest.skip(EXCLUDED[key])(method)
    return method


def _skip_test_fails(self, reason):
    raise AssertionError(
        f"optax's test skipped itself for our implementation: {reason}. Every rmsprop case "
        "must run: fix the cause, or list the case in EXCLUDED with its reason"
    )


def _generate(base, cases, impls, is_sharding=False):
    generated = []
    for impl_name, factory in impls.items():
        cls_name = f"Optax{base.__name__}_{impl_name}"
        # optax's other tests (other optimizers) are switched off in the subclass.
        dct = dict.fromkeys(unittest.TestLoader().getTestCaseNames(base))
        dct["skipTest"] = _skip_test_fails
        dct["__module__"] = __name__
        dct["__qualname__"] = cls_name
        for case in cases:
            if impl_name in ONLY_IN and case["body"].__name__ not in ONLY_IN[impl_name]:
                continue
            name = case["readable"]
            if name in dct and dct[name] is not None:
                raise AssertionError(f"duplicate generated test name {cls_name}.{name}")
            dct[name] = _make_method(case, impl_name, factory, cls_name, is_sharding)
        if cls_name in globals():
            raise AssertionError(f"generated class {cls_name} defined twice")
        generated.append(type(base)(cls_name, (base,), dct))
    return generated


_SHARDING_INSTANCE = sharding_test.OPTIMIZERS.get("rmsprop")

# (optax module, its TestCase class, its rmsprop cases, sharding_test's rmsprop instance)
SOURCES = []
for _mod, _cls, _inst in (
    (alias_test, alias_test.AliasTest, None),
    (_common_test, _common_test.ContribTest, None),
    (float64_test, float64_test.Float64Test, None),
    (sharding_test, sharding_test.ShardingTest, _SHARDING_INSTANCE),
    (transform_test, transform_test.TransformTest, None),
):
    _found = _cases(_cls, _inst)
    _rms = [c for c in _found if c["kind"] in ("scale_by_rms", "patch_rms")]
    _opt = [c for c in _found if c not in _rms]
    SOURCES.append((_mod, _cls, _found, _inst))
    for _group, _impls in ((_opt, IMPLEMENTATIONS), (_rms, SCALE_BY_RMS_IMPLEMENTATIONS)):
        if _group:
            for _new in _generate(_cls, _group, _impls, _mod is sharding_test):
                globals()[_new.__name__] = _new
del _mod, _cls, _inst, _found, _rms, _opt, _group, _impls, _new


def test_every_rmsprop_case_of_optax_is_run():
    """Each optax module has rmsprop cases, and each of its rmsprop cases is generated here."""
    for mod, cls, found, inst in SOURCES:
        assert found, f"{mod.__name__}: no rmsprop case found (optax's tests changed?)"
        missing = _uncovered(cls, found, inst)
        assert not missing, f"{mod.__name__}: rmsprop cases not run here: {missing}"
    generated = {
        f"{name}::{m}"
        for name, obj in globals().items()
        if isinstance(obj, type) and name.startswith("Optax")
        for m in unittest.TestLoader().getTestCaseNames(obj)
    }
    stale = sorted(set(EXCLUDED) - generated)
    assert not stale, f"EXCLUDED names cases that no longer exist: {stale}"


# --------------------------------------------------------------------------- child entry point


def _child_main(out_path: str) -> None:
    assert jax.device_count() >= SHARDING_DEVICES, jax.devices()
    classes = [
        obj
        for name, obj in globals().items()
        if isinstance(obj, type) and name.startswith("OptaxShardingTest_")
    ]
    suite = unittest.TestSuite(
        cls(m) for cls in classes for m in unittest.TestLoader().getTestCaseNames(cls)
    )
    result = _CollectingResult()
    suite.run(result)
    with open(out_path, "w") as f:
        json.dump(result.outcomes, f)


if __name__ == "__main__" and "--sharding-json" in sys.argv:
    _child_main(sys.argv[sys.argv.index("--sharding-json") + 1])
