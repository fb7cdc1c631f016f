"""A key added to the key file is accepted on its first call, however soon after the file's last check it comes."""

from __future__ import annotations

import os

from services.api_keys import ApiKeys


def _swap_in(path, text: str) -> None:
    """As the kubelet updates a Secret volume: a new file under the same name."""
    fresh = path.with_suffix(".new")
    fresh.write_text(text)
    os.replace(fresh, path)


def test_a_key_added_just_after_a_check_is_accepted_at_once(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("old-key\n")
    keys = ApiKeys(path=str(key_file))  # the next timed check is a second away
    assert keys.matches("old-key")

    _swap_in(key_file, "old-key\nnew-key\n")

    assert keys.matches("new-key") and keys.matches("old-key")


def test_a_removed_key_is_refused_once_the_file_is_looked_at_again(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("old-key\nnew-key\n")
    keys = ApiKeys(path=str(key_file))

    _swap_in(key_file, "new-key\n")

    assert not keys.matches("wrong-key")  # a refusal looks at the file, and so reads the change
    assert not keys.matches("old-key") and keys.matches("new-key")
