"""Language rules by NKI release: names a release lacks are absent, and the Python its compiler rejects is rejected at
launch (chosen release) or warned about (default release), with rule, source and the offending line."""

import warnings

import nki
import nki.isa as nisa
import nki.language as nl
import numpy as np
import pytest

import nki_emulator
from nki_emulator import NkiEmulatorError, NkiLanguageWarning, language_rules, run


@pytest.fixture
def release():
    """Select a release for one test, then go back to the default (environment or 0.6, warnings only)."""
    yield nki_emulator.set_nki_version
    nki_emulator.set_nki_version(None)


def _copy_kernel(x):
    t = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=x)
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=out, src=t)
    return out


def kw_only_kernel(x, *, scale=1.0):
    return _copy_kernel(x)


def is_kernel(x, flag=True):
    if flag is True:  # the migration guide's example
        flag = 1
    return _copy_kernel(x)


def is_none_kernel(x, flag=None):
    if flag is None:  # accepted: nki-library at tag 2.29 (NKI 0.3) traces `is None` checks throughout
        flag = 1
    return _copy_kernel(x)


def _helper_with_int_keys(x):
    tiles = {0: x, 1: x}
    return tiles[0]


def helper_kernel(x):
    return _copy_kernel(_helper_with_int_keys(x))


def str_key_kernel(x):
    tiles = {"a": x}
    return _copy_kernel(tiles["a"])


def class_kernel(x):
    class Plain:
        pass

    class Fine(nl.NKIObject):
        n: int = 1

    return _copy_kernel(x)


def fori_kernel(x):
    def body(i):
        nisa.memset(nl.ndarray((1, 1), dtype=nl.float32, buffer=nl.sbuf), 0.0)

    nl.fori_loop(0, 2, body)
    return _copy_kernel(x)


def fori_return_kernel(x):
    def body(i):
        return i

    nl.fori_loop(0, 2, body)
    return _copy_kernel(x)


def neuronxcc_kernel(x):
    import neuronxcc.nki.language as old_nl  # noqa: F401

    return _copy_kernel(x)


X = np.ones((2, 3), np.float32)


def test_kw_only_separator_rejected_from_0_3_with_rule_source_and_line(release):
    release("0.3")
    with pytest.raises(NkiEmulatorError) as e:
        run(nki.jit(kw_only_kernel), X)
    msg = str(e.value)
    assert "kernel kw_only_kernel: kw_only_kernel (test_language_rules.py:" in msg
    assert "keyword-only parameters=(scale)" in msg and "`def kw_only_kernel(x, *, scale=1.0):`" in msg
    assert "nki/migration/index.rst 'Remove keyword-only argument separator'" in msg


def test_kw_only_separator_accepted_by_0_2():
    assert language_rules.check(kw_only_kernel, "0.2") == []
    assert language_rules.oldest_release(kw_only_kernel) is None  # 0.3 to 0.6 all reject it


def test_is_operator_rejected_from_0_3(release):
    release("0.3")
    with pytest.raises(
        NkiEmulatorError, match=r"operator=is in `if flag is True:.*`; `is` / `is not` are not supported"
    ):
        run(nki.jit(is_kernel), X)
    run(nki.jit(is_none_kernel), X)


def test_helper_functions_are_checked_for_int_dict_keys():
    found = language_rules.check(helper_kernel, "0.6")
    assert [(v.rule.id, v.function, v.line) for v in found] == [
        ("dict-key", "_helper_with_int_keys", "tiles = {0: x, 1: x}"),
        ("dict-key", "_helper_with_int_keys", "tiles = {0: x, 1: x}"),
        ("dict-key", "_helper_with_int_keys", "return tiles[0]"),
    ]
    assert language_rules.check(str_key_kernel, "0.6") == []


def test_classes_must_derive_from_nkiobject():
    found = language_rules.check(class_kernel, "0.6")
    assert [(v.rule.id, v.detail) for v in found] == [("class-base", "class Plain()")]


def test_fori_loop_absent_before_0_6(release):
    release("0.5")
    with pytest.raises(AttributeError, match=r"nki.language.fori_loop: not in NKI 0.5 \(.*available from NKI 0.6"):
        nl.fori_loop  # noqa: B018
    assert [v.rule.id for v in language_rules.check(fori_kernel, "0.5")] == ["name-unavailable"]
    release("0.6")
    assert callable(nl.fori_loop)
    out, _ = run(nki.jit(fori_kernel), X)
    np.testing.assert_array_equal(out, X)
    assert language_rules.oldest_release(fori_kernel) == "0.6"


def test_fori_loop_body_returning_a_value_rejected():
    assert [v.rule.id for v in language_rules.check(fori_return_kernel, "0.6")] == ["loop-body-return"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NkiLanguageWarning)
        with pytest.raises(NkiEmulatorError, match="nl.fori_loop: body returned VirtualRegister"):
            run(nki.jit(fori_return_kernel), X)


def test_fori_loop_rejects_no_reorder_block_and_writes_to_induction_variable():
    def in_no_reorder(x):
        with nl.no_reorder():
            nl.fori_loop(0, 1, lambda i: None)
        return _copy_kernel(x)

    def writes_var(x):
        def body(i):
            nisa.register_move(i, 3)

        nl.fori_loop(0, 1, body)
        return _copy_kernel(x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NkiLanguageWarning)
        with pytest.raises(NkiEmulatorError, match=r"nl.fori_loop: inside nl.no_reorder\(\); not allowed"):
            run(nki.jit(in_no_reorder), X)
        with pytest.raises(NkiEmulatorError, match="nisa.register_move: dst is a loop induction variable"):
            run(nki.jit(writes_var), X)


def test_neuronxcc_namespace_rejected_from_0_4():
    assert language_rules.check(neuronxcc_kernel, "0.3") == []
    assert [v.rule.id for v in language_rules.check(neuronxcc_kernel, "0.4")] == ["neuronxcc-namespace"]


def test_tensor_view_methods_arrive_in_0_5(release):
    def permute_kernel(x):
        t = nl.ndarray((2, 3, 4), dtype=nl.float32, buffer=nl.sbuf)
        t.permute((0, 2, 1))
        return _copy_kernel(x)

    release("0.4")
    with pytest.raises(NkiEmulatorError, match=r"NkiTensor.permute \(.*available from NKI 0.5\) in `t.permute"):
        run(nki.jit(permute_kernel), X)  # the launch-time check
    t = nl.ndarray((2, 3, 4), dtype=nl.float32, buffer=nl.sbuf)
    with pytest.raises(NkiEmulatorError, match=r"NkiTensor.permute\(.*\): not in NKI 0.4; .* arrive in NKI 0.5"):
        t.permute((0, 2, 1))  # the method itself, for calls the source check cannot attribute
    release("0.5")
    run(nki.jit(permute_kernel), X)


class _ViewLike(nl.NKIObject):
    """A project class with a `slice` method, as nki-library's TensorView has."""

    def slice(self, dim, start, end):
        return self


def view_like_kernel(x):
    _ViewLike().slice(0, 0, 1)
    return _copy_kernel(x)


def test_tensor_method_names_of_project_classes_are_not_reported():
    assert language_rules.check(view_like_kernel, "0.4") == []


def test_list_arguments_rejected_from_0_3(release):
    release("0.3")
    with pytest.raises(NkiEmulatorError, match="argument 1=list of 2; list kernel arguments are not supported"):
        run(nki.jit(lambda x, sizes: _copy_kernel(x)), X, [1, 2])


def test_default_release_warns_instead_of_failing():
    nki_emulator.set_nki_version(None)
    with pytest.warns(NkiLanguageWarning, match="an error once a release is chosen"):
        run(nki.jit(kw_only_kernel), X)


def test_environment_variable_selects_a_strict_release(release, monkeypatch):
    monkeypatch.setenv("VLLM_NKI_MOE_NKI_VERSION", "0.3.0")
    assert nki_emulator.set_nki_version(None) == "0.3"
    with pytest.raises(NkiEmulatorError, match="rule kw-only-separator"):
        run(nki.jit(kw_only_kernel), X)


def test_unknown_release_rejected():
    with pytest.raises(NkiEmulatorError, match=r"nki_version=\?0.9\?|nki_version='0.9'; the emulator imitates NKI"):
        nki_emulator.set_nki_version("0.9")


class _Cache:
    def __init__(self):
        self.tiles: dict = {}

    def get(self, a, b):
        key = (a, b)
        self.tiles[key] = a
        return self.tiles[key]


class _Ok(nl.NKIObject):
    n: int = 1


def instantiates_kernel(x):
    _Ok(n=2)
    _Cache().get(1, 2)
    return _copy_kernel(x)


def test_instantiated_classes_and_their_tuple_keyed_dicts_are_checked():
    found = language_rules.check(instantiates_kernel, "0.6")
    assert [(v.rule.id, v.function, v.line) for v in found] == [
        ("class-base", "instantiates_kernel", "_Cache().get(1, 2)"),
        ("dict-key", "_Cache.get", "self.tiles[key] = a"),
        ("dict-key", "_Cache.get", "return self.tiles[key]"),
    ]
    assert found[1].detail == "key=key (a tuple) of dict self.tiles"
    assert language_rules.oldest_release(instantiates_kernel) is None
