"""compile_cache.enable: the directory JAX's persistent compilation cache uses."""

import jax
import pytest

from heterrec_jax import compile_cache


@pytest.fixture
def no_cache_dir():
  """No directory set, as in a fresh process without JAX_COMPILATION_CACHE_DIR; restored after."""
  before = jax.config.jax_compilation_cache_dir
  jax.config.update('jax_compilation_cache_dir', None)
  yield
  jax.config.update('jax_compilation_cache_dir', before)


def test_a_directory_already_set_wins():
  current = jax.config.jax_compilation_cache_dir  # conftest sets JAX_COMPILATION_CACHE_DIR
  assert current
  assert compile_cache.enable('/somewhere/else') == current
  assert jax.config.jax_compilation_cache_dir == current


def test_enable_creates_and_sets_the_directory(no_cache_dir, tmp_path, monkeypatch):
  monkeypatch.setenv('HOME', str(tmp_path))
  assert compile_cache.enable('') is None and jax.config.jax_compilation_cache_dir is None
  path = compile_cache.enable('~/cache/xla')
  assert path == str(tmp_path / 'cache' / 'xla') and (tmp_path / 'cache' / 'xla').is_dir()
  assert jax.config.jax_compilation_cache_dir == path


def test_a_directory_that_cannot_be_made_leaves_the_cache_off(no_cache_dir, tmp_path, capsys):
  (tmp_path / 'file').write_text('')
  assert compile_cache.enable(str(tmp_path / 'file' / 'xla')) is None
  assert jax.config.jax_compilation_cache_dir is None
  assert capsys.readouterr().err.startswith('warning: compilation cache off')
