"""Fetch a Hugging Face Llama or Qwen3 checkpoint (weights, configs, tokenizer; nothing else) into checkpoints/REPO_ID.

    python scripts/download.py meta-llama/Llama-3.1-8B-Instruct [--out DIR] [--revision R]
    python scripts/download.py Qwen/Qwen3-4B-Instruct-2507

Gated models need a token whose account has accepted the licence: huggingface_hub reads HF_TOKEN
(or the token saved by `hf auth login`). config.json is
fetched and checked against model.py first, so an unsupported model fails before gigabytes move.
Prints the checkpoint directory on stdout; any failure is one line on stderr and exit code 2.
"""
import argparse
import sys
import tempfile
from pathlib import Path

from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, snapshot_download
from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                    RevisionNotFoundError)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # model.py lives at the top level of the repo
from model import CheckpointError, LlamaConfig, read_json  # noqa: E402

ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.jinja"]


class DownloadError(Exception):
    pass


def main(repo_id: str, out: Path | None, revision: str | None) -> None:
    if constants.HF_HUB_OFFLINE:
        raise DownloadError(f"HF_HUB_OFFLINE is set, so {repo_id} cannot be downloaded")
    out = out or ROOT / "checkpoints" / repo_id
    with tempfile.TemporaryDirectory() as tmp:
        # One HEAD request without retries first: huggingface_hub's downloads retry a dead network for ~25 s.
        fetch(repo_id, revision, lambda: get_hf_file_metadata(hf_hub_url(repo_id, "config.json", revision=revision),
                                                              timeout=10))
        config = fetch(repo_id, revision, lambda: hf_hub_download(repo_id, "config.json", revision=revision,
                                                                  local_dir=tmp))
        try:
            LlamaConfig.from_hf(read_json(Path(config)))
        except CheckpointError as e:
            raise DownloadError(f"{repo_id} cannot run here: {e}") from None
    print(f"downloading {repo_id} into {out}", file=sys.stderr)
    fetch(repo_id, revision, lambda: snapshot_download(repo_id, revision=revision, local_dir=out,
                                                       allow_patterns=ALLOW_PATTERNS))
    print(out)


def fetch(repo_id: str, revision: str | None, call):
    """Run one huggingface_hub call; its failure becomes one DownloadError line."""
    try:
        return call()
    except GatedRepoError:
        raise DownloadError(f"{repo_id} is gated: accept its licence on huggingface.co and set HF_TOKEN "
                            f"to a token of that account") from None
    except RepositoryNotFoundError:
        raise DownloadError(f"{repo_id} not found on {constants.ENDPOINT} (a private repo needs HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise DownloadError(f"revision {revision!r} not found in {repo_id}") from None
    except EntryNotFoundError:
        raise DownloadError(f"{repo_id} has no config.json, so it is not a transformers checkpoint") from None
    except HfHubHTTPError as e:
        raise DownloadError(f"{repo_id}: {str(e).splitlines()[0]}") from None
    except Exception as e:   # connection errors: their class depends on the huggingface_hub version
        raise DownloadError(f"cannot reach {constants.ENDPOINT} ({type(e).__name__}: {e}); "
                            f"check the network or HF_ENDPOINT") from None


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Download a Hugging Face Llama or Qwen3 checkpoint into checkpoints/REPO_ID.")
    parser.add_argument("repo_id", help="e.g. meta-llama/Llama-3.1-8B-Instruct, Qwen/Qwen3-4B-Thinking-2507")
    parser.add_argument("--out", type=Path, help="target directory (default: checkpoints/REPO_ID)")
    parser.add_argument("--revision", help="branch, tag or commit (default: main)")
    try:
        main(**vars(parser.parse_args()))
    except DownloadError as e:
        print(f"download.py: error: {e}", file=sys.stderr)
        sys.exit(2)
