"""The Fashion-MNIST CNN of our own (trained here on a subset; the full model trains once and is cached)."""

import pytest
import torch

from tensorpress.zoo import fashion, mnist


@pytest.mark.slow
def test_short_training_learns_and_shapes_match():
    model = fashion.train_fashion_cnn(epochs=1, progress=False, n_train=3000)
    x, y = mnist.fashion_mnist("test")
    assert model(x[:4]).shape == (4, 10)
    assert not model.training
    assert mnist.accuracy(model, x[:2000], y[:2000]) > 0.6  # chance is 0.1


def test_training_arguments_are_checked():
    with pytest.raises(ValueError, match="epochs"):
        fashion.train_fashion_cnn(epochs=0)
    with pytest.raises(ValueError, match="n_train"):
        fashion.train_fashion_cnn(n_train=-5)


def test_cached_model_is_loaded_without_training(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORPRESS_CACHE", str(tmp_path))
    torch.manual_seed(3)
    saved = fashion.FashionCNN()
    torch.save(saved.state_dict(), tmp_path / fashion.CACHE_NAME)
    monkeypatch.setattr(fashion, "train_fashion_cnn", lambda **kw: pytest.fail("trained instead of loading"))
    loaded = fashion.load_fashion_cnn(progress=False)
    for a, b in zip(saved.parameters(), loaded.parameters()):
        assert torch.equal(a, b)
