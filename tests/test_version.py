"""The torch floor: an old torch is refused at import with a clear message."""
import pytest

from mmgradfilt.version import check_torch


@pytest.mark.parametrize('version', ['2.3.1', '2.3.0+cpu', '1.12.1', '2.0'])
def test_old_torch_is_refused_naming_it(version):
    with pytest.raises(ImportError, match=f'needs torch >= 2.4, found torch '
                       f'{version.replace("+", "[+]")}'):
        check_torch(version)


@pytest.mark.parametrize('version', ['2.4.0', '2.13.0+cu130', '2.10.0a0', '3.0'])
def test_supported_torch_passes(version):
    check_torch(version)
