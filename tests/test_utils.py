"""lib.utils: one name is one name; a single text is not a list of letters; seeding is deterministic."""
from __future__ import annotations

import pytest
import torch

from lib import xor
from lib.utils import as_names, require_texts, set_seed


def test_a_string_is_one_name():
    assert as_names("cities") == ["cities"]
    assert as_names(("cities", "neg_cities")) == ["cities", "neg_cities"]
    with pytest.raises(TypeError, match="features must be a name or a list"):
        as_names(3, "features")
    with pytest.raises(TypeError, match="must be strings"):
        as_names(["a", 1])


def test_entry_points_take_one_name_as_a_string():
    assert xor.feature_order("has_true") == ["has_true"]  # was ['e', 'h', 'r', 's', 't', 'u', '_', 'a']


def test_a_single_text_is_refused_where_a_list_is_needed():
    with pytest.raises(TypeError, match="wrap it in a list"):
        require_texts("The city of Paris is in France.")
    with pytest.raises(TypeError, match="item 1 is int"):
        require_texts(["a", 2])


def test_set_seed_makes_reruns_identical_and_fixes_threads():
    before = torch.get_num_threads()
    try:
        set_seed(3, threads=1)
        assert torch.get_num_threads() == 1
        a = torch.randn(1000) @ torch.randn(1000, 50)
        set_seed(3, threads=1)
        b = torch.randn(1000) @ torch.randn(1000, 50)
        assert torch.equal(a, b)
    finally:
        torch.set_num_threads(before)
