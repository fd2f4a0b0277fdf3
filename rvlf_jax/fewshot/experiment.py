"""The few-shot experiment behind `launch.fewshot`: data, text semantics, training, the table.

    results = experiment.run(config, workdir)

1. Isolated SynthSign signs (`data.synthsign.isolated`), featurised as the SLT recipe does
   (joint subset `data.joints`), cached in WORKDIR/data; classes split into base / validation /
   novel, signers into base / held-out (`fewshot.episodes.split_classes`).
2. A text encoder: the decoder at `text.decoder` (an HF folder, e.g. a recipe run's
   WORKDIR/decoder), or a small decoder pretrained here on SynthSign's English sentences and the
   lexicon's attribute phrases (`recipe.lm.pretrain_to_hf`, saved in HF format and loaded back
   through the HF import). Its mean-pooled final states embed the class texts.
3. DSC (`fewshot.dsc`): candidate attributes from SynthSign's lexicon (no pretrained language
   model exists on this machine; `dsc.LanguageModelAttributes` prompts any HF decoder for them
   instead), k chosen per class by progressive selection, a holistic description.
4. One text-free pre-training on base classes, then for every method of `config.methods`
   episodic tuning and a test on 2,000 novel-class episodes per shot (`fewshot.run`).

Writes WORKDIR/results.json (every score, CI and learned gate), WORKDIR/semantics.json (the
texts each class got) and WORKDIR/results.md (the table); returns the results.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np

from configs import synthsign as synthsign_config
from rvlf_jax import sharding
from rvlf_jax.data import tokenizers
from rvlf_jax.data.synthsign import SynthSign, isolated
from rvlf_jax.fewshot import dsc, episodes, model as model_lib, run as run_lib, train
from rvlf_jax.models import decoder as decoder_lib
from rvlf_jax.models import gates, skeleton
from rvlf_jax.recipe import lm

Log = Callable[[str], None]
ANCHOR_SENTENCES = 3  # copies of each class's texts in the text encoder's corpus


def _write_json(path: str, value: Any) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def load_pool(config: ml_collections.ConfigDict, workdir: str, log: Log) -> run_lib.Pool:
  """The isolated clips as arrays (built once into WORKDIR/data)."""
  d = config.data
  signs = isolated.IsolatedSigns(d.seed, repetitions=d.repetitions)
  recipe = synthsign_config.get_config()
  recipe.data.joints = d.joints
  featurizer = isolated.recipe_featurizer(recipe)
  pool = isolated.build_pool(signs, os.path.join(workdir, 'data'), featurizer=featurizer,
                             workers=d.workers or None, log=log)
  return run_lib.Pool(pool['keypoints'], pool['frame_mask'], pool['classes'], pool['signers'],
                      list(pool['glosses']))


def _class_texts(names) -> list[str]:
  """Every text DSC may embed for these classes: anchors and attribute phrases."""
  out = []
  for name in names:
    phrases = isolated.attribute_phrases(name)
    out.append(dsc.ANCHOR.format(name=name))
    out.extend(dsc.ATTRIBUTE_TEMPLATE.format(name=name, attribute=p) for p in phrases.values())
  return out


def text_encoder(config: ml_collections.ConfigDict, names, workdir: str,
                 log: Log) -> dsc.DecoderEmbedder:
  """The decoder whose pooled states embed the class texts (module docstring, step 2)."""
  t = config.text
  if t.decoder:
    log(f'text encoder: {t.decoder}')
    return dsc.DecoderEmbedder.load(t.decoder)
  out = os.path.join(workdir, 'text_decoder')
  texts = SynthSign('default', seed=config.data.seed).text_corpus('train')
  texts += _class_texts(names) * ANCHOR_SENTENCES
  tok_path = os.path.join(workdir, 'text_tokenizer', 'spm.model')
  if os.path.exists(tok_path):
    tokenizer = tokenizers.SentencePieceTokenizer.load(tok_path)
  else:
    os.makedirs(os.path.dirname(tok_path), exist_ok=True)
    tokenizer = tokenizers.SentencePieceTokenizer.train(texts, t.vocab_size, tok_path)
  dcfg = decoder_lib.DecoderConfig.tiny(
      'llama', vocab_size=tokenizer.vocab_size, hidden_size=t.hidden_size,
      intermediate_size=3 * t.hidden_size, num_layers=t.num_layers, num_heads=4, num_kv_heads=2,
      head_dim=t.hidden_size // 4, max_position_embeddings=128)
  lm.pretrain_to_hf(dcfg, tokenizer, texts, lm.LMConfig(steps=t.lm_steps, max_len=48), out,
                    log=log)
  config_hf, params = lm.load_pretrained(out)
  return dsc.DecoderEmbedder(decoder_lib.Decoder(config_hf), params, tokenizer)


def semantics(names, embedder: dsc.DecoderEmbedder, config: ml_collections.ConfigDict,
              use_dsc: bool) -> tuple[run_lib.Semantics, dsc.ClassSemantics]:
  source = dsc.LexiconAttributes(isolated.attribute_phrases)
  sem = dsc.build_semantics(names, source, embedder, config.text.k, use_dsc=use_dsc,
                            redundancy=config.text.redundancy)
  return run_lib.Semantics(sem.text_tokens, sem.text_mask, sem.class_text), sem


def model_config(config: ml_collections.ConfigDict, num_joints: int,
                 text_dim: int) -> model_lib.FewShotModelConfig:
  m, d = config.model, config.data
  parts = skeleton.subset_parts(d.joints, selected=True) if d.joints else skeleton.SkeletonConfig().parts
  sk = skeleton.SkeletonConfig(parts=parts, num_joints=num_joints, part_dim=m.part_dim,
                               d_model=m.d_model, num_layers=0, num_heads=m.num_heads,
                               mlp_dim=m.mlp_dim, dropout=m.dropout,
                               temporal_strides=tuple(m.temporal_strides))
  gate = gates.GateConfig(concentration=m.concentration, scope=m.gate_scope)
  return model_lib.FewShotModelConfig(skeleton=sk, num_layers=m.num_layers,
                                      rla_at=tuple(m.rla_at), gate=gate, text_dim=text_dim)


def _table(results: dict[str, Any], shots) -> str:
  head = '| method | ' + ' | '.join(f'5-way {k}-shot' for k in shots) + ' | gates (per RLA layer) |'
  rows = [head, '|' + '---|' * (len(shots) + 2)]
  for name, r in results['methods'].items():
    cells = [f'{100 * r[f"{k}shot"]["accuracy"]:.2f} +- {100 * r[f"{k}shot"]["ci95"]:.2f}'
             for k in shots]
    gate_list = r[f'{shots[-1]}shot']['gates']
    rows.append(f'| {name} | ' + ' | '.join(cells) + ' | '
                + (', '.join(f'{g:.2f}' for g in gate_list) or '-') + ' |')
  return '\n'.join(rows) + '\n'


def run(config: ml_collections.ConfigDict, workdir: str, log: Log = print) -> dict[str, Any]:
  """The whole experiment (module docstring); returns what results.json holds."""
  os.makedirs(workdir, exist_ok=True)
  methods = [run_lib.Method(m) for m in config.methods]
  mesh = sharding.mesh_from_config(dict(config.mesh))
  start = time.time()
  pool = load_pool(config, workdir, log)
  d = config.data
  split = episodes.split_classes(pool.classes, pool.signers,
                                 num_val_classes=d.num_val_classes,
                                 num_novel_classes=d.num_novel_classes,
                                 num_novel_signers=d.num_novel_signers,
                                 rng=np.random.default_rng(d.split_seed))
  log(f'{len(pool.classes)} clips of {len(pool.names)} signs: {len(split.base_classes)} base '
      f'classes ({len(split.base)} clips, signers {split.base_signers.tolist()}), '
      f'{len(split.val_classes)} validation, {len(split.novel_classes)} novel ({len(split.novel)} '
      f'clips, signers {split.novel_signers.tolist()}).')
  e, t = config.eval, config.tune
  # Episodes the pool cannot supply fail here, before any training.
  episodes.sample_episode(pool.classes, split.base, t.n_way, t.k_shot, t.n_query,
                          np.random.default_rng(0))
  for k in e.shots:
    episodes.sample_episode(pool.classes, split.novel, e.n_way, k, e.n_query,
                            np.random.default_rng(0))
  embedder = text_encoder(config, pool.names, workdir, log) if any(
      m.uses_text for m in methods) else None
  sems = {}
  for use_dsc in sorted({m.dsc for m in methods if m.uses_text}):
    sems[use_dsc], texts = semantics(pool.names, embedder, config, use_dsc)
    if use_dsc:
      _write_json(os.path.join(workdir, 'semantics.json'), texts.to_dict())
      log(f'DSC, e.g. {texts.class_names[0]}: {texts.descriptions[0]}')
  text_dim = embedder.dim if embedder else 1
  base_cfg = model_config(config, pool.keypoints.shape[2], text_dim)
  pre = config.pretrain
  pretrained = run_lib.pretrain(
      base_cfg, pool, split.base,
      run_lib.PretrainConfig(pre.steps, pre.batch_size, pre.learning_rate, pre.weight_decay,
                             pre.warmup_steps), seed=config.seed, mesh=mesh, log=log)
  objective = train.ObjectiveConfig(rl_coef=t.rl_coef, entropy_coef=t.entropy_coef)
  tune_cfg = run_lib.TuneConfig(t.steps, t.n_way, t.k_shot, t.n_query, t.learning_rate,
                                t.policy_learning_rate, t.weight_decay, objective)
  results = {'config': config.to_dict(), 'methods': {}, 'split': {
      'base_classes': len(split.base_classes), 'val_classes': len(split.val_classes),
      'novel_classes': len(split.novel_classes), 'base_signers': split.base_signers.tolist(),
      'novel_signers': split.novel_signers.tolist()}}
  for method in methods:
    cfg = base_cfg.replace(rla_at=tuple(config.model.rla_at) if method.uses_text else (),
                           gate=method.gate(base_cfg.gate))
    sem = sems[method.dsc] if method.uses_text else None
    log(f'-- {method.name}: tuning')
    params, history = run_lib.tune(cfg, pretrained, pool, split.base, sem, tune_cfg,
                                   seed=config.seed, mesh=mesh, log=log)
    row = {'history': history}
    for k in e.shots:
      r = run_lib.evaluate(cfg, params, pool, split.novel, sem, n_way=e.n_way, k_shot=k,
                           n_query=e.n_query, num_episodes=e.episodes, seed=config.seed + k,
                           mesh=mesh)
      log(f'{method.name}: {e.n_way}-way {k}-shot {100 * r["accuracy"]:.2f} +- '
          f'{100 * r["ci95"]:.2f} % over {r["episodes"]} episodes, gates {r["gates"]} '
          f'({r["seconds"]:.0f} s)')
      row[f'{k}shot'] = r
    results['methods'][method.name] = row
    _write_json(os.path.join(workdir, 'results.json'), results)
  results['seconds'] = time.time() - start
  _write_json(os.path.join(workdir, 'results.json'), results)
  table = _table(results, tuple(e.shots))
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(table)
  log(table)
  return results

