import pytest

from compress.errors import CompressError
from compress.targets import check_patterns, layer_index, select_modules


def test_select_by_regex_in_model_order(tiny_llama):
    found = select_modules(tiny_llama, [r"re:.*\.(q|k|v|o|gate|up|down)_proj$"])
    assert len(found) == 2 * 7
    layers = [layer_index(name) for name in found]
    assert layers == sorted(layers)


def test_select_by_class_name_and_ignore(tiny_llama):
    found = select_modules(tiny_llama, ["Linear"], ignore=["re:lm_head", r"re:.*\.mlp\..*"])
    assert all(".mlp." not in name and name != "lm_head" for name in found)
    assert len(found) == 2 * 4


def test_zero_matches_is_an_error(tiny_llama):
    with pytest.raises(CompressError, match="matched no module"):
        select_modules(tiny_llama, ["re:.*\\.nothing_proj$"])


def test_ignore_that_matches_nothing_is_an_error(tiny_llama):
    with pytest.raises(CompressError, match="ignore pattern"):
        select_modules(tiny_llama, ["Linear"], ignore=["re:typo_proj"])


def test_pattern_syntax_checked():
    assert check_patterns(["Linear", "re:.*proj$"]) == []
    assert check_patterns(["re:("])
    assert check_patterns(["not a class"])
