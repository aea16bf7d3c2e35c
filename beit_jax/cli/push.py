"""`beit-jax push FOLDER USER/REPO`: upload a fine-tuned model's OUTPUT/hub folder to the Hugging
Face Hub, as timm's push_to_hf_hub does (create the repo if needed, upload the folder)."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "push", help="upload a fine-tuned model's OUTPUT/hub folder to the Hugging Face Hub (timm's layout)",
        description="Upload FOLDER (OUTPUT/hub of `beit-jax finetune`: config.json, model.safetensors, README.md) "
                    "to the Hugging Face Hub repo USER/REPO, created if missing. timm then loads it with "
                    "timm.create_model('hf-hub:USER/REPO', pretrained=True). Credentials: `huggingface-cli login` "
                    "or HF_TOKEN.")
    p.add_argument("folder", help="the export folder (OUTPUT/hub)")
    p.add_argument("repo_id", metavar="USER/REPO", help="Hub repo id")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo is left as it is)")
    p.add_argument("--revision", default=None, help="branch to commit to (created if missing; default: main)")
    p.add_argument("--commit-message", default="Add model", help="commit message (default: %(default)s)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..publish import push_folder

    info = push_folder(args.folder, args.repo_id, private=args.private, revision=args.revision,
                       commit_message=args.commit_message)
    print(f"pushed {args.folder} to {getattr(info, 'commit_url', None) or args.repo_id}")
    return 0
