"""TRITON_INTERPRET is set only on a machine without a CUDA device (tests/conftest.py)."""

from tests.conftest import interpret_setting


def test_interpreter_only_without_a_cuda_device():
    env = {}
    interpret_setting(False, env)
    assert env == {"TRITON_INTERPRET": "1"}
    env = {"TRITON_INTERPRET": "1"}  # inherited from the shell: removed on a GPU machine
    interpret_setting(True, env)
    assert "TRITON_INTERPRET" not in env
    env = {}
    interpret_setting(True, env)
    assert env == {}
