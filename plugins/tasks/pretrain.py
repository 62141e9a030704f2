"""Pre-training objectives on image–caption pairs: MLM, ITM and (region backbones) MRFR.

Captions come in the Karpathy split json (`dataset_<name>.json`: `images[*].filename`,
`sentences[*].raw`, `split`; "restval" images train with "train"), with images as
`images/<stem>.png` and region features as `features/<stem>.npz` or a UNITER img_db; or as
UNITER's pre-training txt_dbs (`txt_db/pretrain_coco_train.db`, `…_restval.db`, `…_val.db`,
`pretrain_vg_train.db`: split names `coco_train+coco_restval+vg_train` and `coco_val`) with
`img_db/coco_train2014/`, `coco_val2014/`, `vg/`. Used to pre-train each backbone's tiny preset
on the embedded world (the world's θ0) and to find task-agnostic tickets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vl_prune.backbone import Backbone, VLBatch
from vl_prune.data.arrow import table_splits
from vl_prune.data.inputs import ImageName, ImageStore, TokenIds, encode
from vl_prune.data.txt_db import TxtDb, TxtDbExamples, has_dbs, locate, split_dbs
from vl_prune.task import DataOptions, Task, TaskBatch, symmetric_kl
from vl_prune_plugins.tasks.karpathy import (
    caption_tables,
    db_keys,
    read_split,
    split_names,
    table_images,
)
from vl_prune_plugins.tasks.uniter_dbs import image_names, use_txt_dbs

MASK_RATE = 0.15
IGNORE = -100
#: UNITER's pre-training txt_dbs (txt_db/pretrain_<part>.db): what trains, what scores
TXT_DB = "pretrain"
TXT_DB_TRAIN, TXT_DB_EVAL = ("coco_train", "coco_restval", "vg_train"), "coco_val"
#: Karpathy's "restval" images train with "train"
READS = {"train": ("train", "restval")}
#: ViLT's caption tables (coco_caption_karpathy_<split>.arrow, or Flickr30k's)
ARROWS = ("coco_caption_karpathy", "f30k_caption_karpathy")


@dataclass(frozen=True)
class Caption:
    text: str | TokenIds
    image: ImageName


class PretrainHead(nn.Module):
    """MLM over text states, ITM over the pooled vector, MRFR over region states.

    Its outputs also carry `text_mask`, the text's attention mask (B × L: 1 at real tokens, 0
    at padding), so that `Pretrain.consistency` averages the MLM term over real tokens only."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        hidden = backbone.hidden_size

        def transform(out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, out)
            )

        self.mlm = transform(backbone.vocab_size or len(backbone.tokenizer))
        self.itm = nn.Linear(hidden, 2)
        self.mrfr = transform(backbone.img_dim) if backbone.image_input == "regions" else None

    def forward(self, backbone: Backbone, inputs: list[VLBatch]) -> dict[str, torch.Tensor]:
        out = backbone(inputs[0])
        outputs = {
            "mlm": self.mlm(out.text_states),
            "itm": self.itm(out.pooled),
            "text_mask": inputs[0].attention_mask,
        }
        if self.mrfr is not None:
            outputs["mrfr"] = self.mrfr(out.image_states)
        return outputs


class Pretrain(Task):
    """Pre-training: masked language modelling, image-text matching, masked region features."""

    description = "pre-training objectives: MLM + ITM (+ MRFR for region backbones)"
    metric = "mlm_itm_accuracy"

    def __init__(self, data: str | Path, options: DataOptions | None = None):
        super().__init__(data, options)
        # image → every caption read for it: a pair is matched when its caption is among them.
        self.captions_of: dict[str, set[str]] = {}

    def default_splits(self) -> tuple[str, str]:
        """UNITER's txt_dbs (`coco_train+coco_restval+vg_train` as far as present,
        `coco_val`), else the Karpathy file's `train` and `val` (the world's `dev`)."""
        if has_dbs(self.data, TXT_DB):
            present = [p for p in TXT_DB_TRAIN if locate(self.data, f"{TXT_DB}_{p}.db")]
            return "+".join(present) or TXT_DB_TRAIN[0], TXT_DB_EVAL
        for prefix in ARROWS:
            if splits := table_splits(self.data, prefix):
                return "+".join(p for p in ("train", "restval") if p in splits) or "train", "val"
        return "train", "val" if "val" in split_names(self.data) else "dev"

    def examples(self, split: str) -> list[Caption] | TxtDbExamples:
        dbs = split_dbs(self.data, TXT_DB, split)
        if dbs is not None:
            use_txt_dbs(self, dbs, ImageStore(self.data, db_keys))
            return TxtDbExamples(dbs, _from_txt_db)
        tables = caption_tables(self.data, ARROWS, split)
        if tables is not None:
            images = table_images(tables)
        else:
            read = read_split(self.data, split, READS.get(split, ()))
            images = [(image.stem, image.captions) for image in read]
        out = []
        for image, captions in images:
            out += [Caption(text, image) for text in captions]
            self.captions_of.setdefault(image, set()).update(captions)
        return out

    def head(self, backbone: Backbone) -> nn.Module:
        self.check_backbone(backbone)
        return PretrainHead(backbone)

    def collate(self, examples: list[Caption], backbone: Backbone) -> TaskBatch:
        # Randomness comes from torch's generator, which the trainer seeds.
        n = len(examples)
        matched = torch.rand(n) < 0.5
        images = []
        for i, example in enumerate(examples):
            image = example.image
            if not matched[i]:
                # A few tries at an image the caption is false of, as far as its captions say.
                for j in torch.randint(n, (8,)).tolist():
                    image = examples[j].image
                    if not self._true_of(example, image):
                        break
            images.append(image)
        matched = torch.tensor(
            [self._true_of(e, image) for e, image in zip(examples, images, strict=True)]
        )
        store = ImageStore(self.data, db_keys)
        batch = encode(
            [e.text for e in examples], images, backbone, store, max_length=self.text_length
        )
        labels = _mask_tokens(batch, *self._mlm_ids(examples[0], backbone))
        labels[~matched] = IGNORE  # words of a wrong caption cannot be read off the image
        targets = {"mlm": labels, "itm": matched.long()}
        if backbone.image_input == "regions":
            masked = (torch.rand(batch.region_mask.shape) < MASK_RATE) & batch.region_mask.bool()
            targets["mrfr"] = batch.region_feats.float() * masked.unsqueeze(-1)
            targets["mrfr_mask"] = masked
            batch.masked_regions = masked
            batch.region_feats = batch.region_feats.masked_fill(masked.unsqueeze(-1), 0)
        return TaskBatch([batch], targets)

    def _mlm_ids(self, example: Caption, backbone: Backbone) -> tuple[list[int], int, range]:
        """The special ids never masked, the [MASK] id, and the ids random words come from:
        the txt_dbs' for texts from them, else the tokenizer's."""
        vocabulary = self.text_vocabulary
        if not isinstance(example.text, str) and vocabulary is not None:
            return [vocabulary.cls, vocabulary.sep], vocabulary.mask, range(*vocabulary.words)
        tokenizer = backbone.tokenizer
        return tokenizer.all_special_ids, tokenizer.mask_token_id, range(len(tokenizer))

    def _true_of(self, example: Caption, image: str) -> bool:
        """Whether the caption is true of the image: its own, or one of the image's captions."""
        return image == example.image or example.text in self.captions_of.get(image, ())

    def loss(self, outputs: dict, targets: dict) -> torch.Tensor:
        mlm = outputs["mlm"]
        loss = nn.functional.cross_entropy(
            mlm.reshape(-1, mlm.shape[-1]), targets["mlm"].reshape(-1), ignore_index=IGNORE
        )
        loss = loss.nan_to_num(0.0) + nn.functional.cross_entropy(outputs["itm"], targets["itm"])
        if "mrfr" in outputs and targets["mrfr_mask"].any():
            chosen = targets["mrfr_mask"]
            loss = loss + nn.functional.mse_loss(outputs["mrfr"][chosen], targets["mrfr"][chosen])
        return loss

    def predict(self, outputs: dict) -> dict:
        return {"mlm": outputs["mlm"].argmax(-1), "itm": outputs["itm"].argmax(-1)}

    def consistency(self, clean: dict, perturbed: dict) -> torch.Tensor:
        """The symmetric KL of the MLM and ITM predictions (MRFR regresses, it has none); the
        MLM term is averaged over the real tokens only (`text_mask`), as padding's predictions
        mean nothing."""
        mlm = symmetric_kl(clean["mlm"], perturbed["mlm"], mask=clean["text_mask"])
        return mlm + symmetric_kl(clean["itm"], perturbed["itm"])

    def score(self, predictions: dict, targets: dict) -> float:
        """The mean of MLM accuracy (masked tokens) and ITM accuracy."""
        labelled = targets["mlm"] != IGNORE
        mlm = (predictions["mlm"][labelled] == targets["mlm"][labelled]).float().mean()
        itm = (predictions["itm"] == targets["itm"]).float().mean()
        return ((mlm.nan_to_num(0.0) + itm) / 2).item()


def _mask_tokens(batch: VLBatch, special: list[int], mask: int, words: range) -> torch.Tensor:
    """BERT's masking: 15% of real tokens (not `special`, not padding) are predicted; of those
    80% become [MASK] (`mask`), 10% a random word of `words`, 10% stay. Returns the labels
    (IGNORE elsewhere) and edits input_ids in place."""
    ids = batch.input_ids
    chosen = (
        (torch.rand(ids.shape) < MASK_RATE)
        & ~torch.isin(ids, torch.tensor(special))
        & batch.attention_mask.bool()
    )
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    roll = torch.rand(ids.shape)
    ids[chosen & (roll < 0.8)] = mask
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    ids[swap] = torch.randint(words.start, words.stop, ids.shape)[swap]
    return labels


def _from_txt_db(db: TxtDb, key: str, record: dict) -> Caption:
    """A caption of UNITER's pre-training txt_dbs: its `input_ids` and image (`img_fname`)."""
    (image,) = image_names(record, 1, f"{db.path}: key {key!r}")
    return Caption(db.with_specials(record["input_ids"]), image)
