"""The top-level surface: every exported name resolves to the object its module defines, lazily."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import muco


@pytest.mark.parametrize("name", sorted(muco.EXPORTS))
def test_exported_name_is_the_modules_object(name):
    assert getattr(muco, name) is getattr(importlib.import_module(muco.EXPORTS[name]), name)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'MuCoEncodr'"):
        muco.MuCoEncodr  # noqa: B018


def test_import_muco_loads_no_torch():
    code = "import sys, muco; print('torch' in sys.modules, muco.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", muco.__version__]


def test_the_model_cards_muco_line_names_real_api():
    import inspect
    import re

    import torch

    from muco.export import model_card
    from muco.inputs.image_policy import ImagePolicy
    from muco.inputs.tokenizer import SpecialTokenIds

    card = model_card(SpecialTokenIds(*range(7)), ImagePolicy.preset("tiny"), 8, torch.float32)
    line = re.search(r"`muco\.(\w+)\.(\w+)\(path\)\.(\w+)\((.*)\)`", card)
    assert line, card[-300:]
    cls = getattr(muco, line[1])  # the card's own code: no AttributeError
    assert callable(getattr(cls, line[2]))
    params = inspect.signature(getattr(cls, line[3])).parameters
    assert all(kw.split("=")[0].strip() in params for kw in line[4].split(", "))
