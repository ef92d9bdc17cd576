"""lazy_names: a package name imports its module when first read, and only then."""

import sys

import pytest

from common.lazy_names import lazy_names


def test_a_name_imports_its_module_on_first_read_only():
    sys.modules.pop("colorsys", None)
    package_getattr = lazy_names("some.package", {"colorsys": ("rgb_to_hsv", "hsv_to_rgb")})
    assert "colorsys" not in sys.modules  # building the table imports nothing
    rgb_to_hsv = package_getattr("rgb_to_hsv")
    import colorsys

    assert rgb_to_hsv is colorsys.rgb_to_hsv and package_getattr("hsv_to_rgb") is colorsys.hsv_to_rgb


def test_an_unlisted_name_raises_attribute_error_naming_package_and_name():
    package_getattr = lazy_names("some.package", {"colorsys": ("rgb_to_hsv",)})
    with pytest.raises(AttributeError, match="'some.package' has no attribute 'yiq'"):
        package_getattr("yiq")
