import pytest


@pytest.fixture(scope="session")
def smollm2_checkpoint():
    """The embedded SmolLM2-135M-Instruct, converted into checkpoints/ once and reused across runs."""
    import convert_gguf
    return convert_gguf.ensure_default_checkpoint()
