"""Pseudo-target images: what a query's target might look like, made from its reference
image and modification text by an image editor (TMCIR's stage 1 aligns the text with them).

`circe pseudo-targets --dataset D --generator G --out DIR` writes them, with a manifest,
resumably (`circe.pseudo_targets.manifest`). Generators, one interface
(`circe.pseudo_targets.generate.PseudoTargetGenerator`):
  - `diffusers`: a diffusers image-editing pipeline (InstructPix2Pix) from a local directory,
    the real path for real data sets (on a GPU);
  - `directory`: pseudo-targets made elsewhere, one image per query id;
  - `scene-editor`: the synthetic benchmark's stand-in for a diffusion editor, which applies
    the parsed edit to the reference scene with mistakes at a set rate.
"""
