"""Where the official SAF code's targets come from: a NumPy replay of its data order.

The authors' code (github.com/AngusDujw/SAF at 6e856004c59f9a8497d48e4a5d545e59f7b87d3e)
keeps one table of past logits in each training process (``SAF_train.py:336``), writes an
example's logits into slot ``epoch % (E_tilde + 1)`` of row ``index`` (``:726``) and, once
``epoch > kl_start_epoch`` (0-based epochs, ``:734``), reads its target from slot
``(epoch - E_tilde) % (E_tilde + 1)`` of the same row (``:735``). This script replays, per
process and per epoch:

* torch's ``DistributedSampler`` (``timm/data/loader.py:217``: shuffle, seed 0, no
  drop_last): a permutation drawn from ``seed + epoch``, padded with its first entries to a
  multiple of the processes, process ``r`` taking entries ``r::R``. NumPy's permutation
  stands in for ``torch.randperm``: the same distribution, not the same numbers;
* the ``DataLoader``'s ``drop_last=True`` (``loader.py:239``): the last partial batch of
  each process is not trained;
* optionally (``prefetcher``) timm's ``PrefetchLoader`` as modified there
  (``loader.py:88-109``): it yields the indices of the batch it has just fetched with the
  images of the batch before, so every batch but an epoch's last is paired with the next
  batch's indices (the default: ``--no-prefetcher`` is off in every script).

Each target read falls into one of four classes: the same example's logits from exactly
``E_tilde`` epochs ago (the target Eq. 9 asks for), the same example's logits from an
older epoch, another example's logits, or a row never written (all zeros: a uniform
target). Fractions are over every target read in the epochs where the loss is on.

Run from the repository root (about 10 s on one CPU core)::

  python docs/benchmarks/authors_sampler_simulation.py
"""

import argparse

import numpy as np

CLASSES = ('right', 'older', 'other_example', 'zero_row')


def simulate(
  num_examples: int,
  processes: int,
  E_tilde: int,
  *,
  prefetcher: bool,
  batch_size: int = 256,
  epochs: int = 100,
  kl_start_epoch: int = 5,
  seed: int = 0,
) -> dict[str, float]:
  """Fractions of the targets read in epochs ``kl_start_epoch + 1 .. epochs - 1`` (0-based).

  Args:
    num_examples: training examples N.
    processes: R, the world size (one table per process).
    E_tilde: ``--minus_epoch``.
    prefetcher: replay the modified ``PrefetchLoader``'s index/image pairing.
    batch_size: ``-b``, per process.
    epochs: epochs run, cool-down included (run.sh: 90 + timm's 10).
    kl_start_epoch: ``--kl_start_epoch``.
    seed: the sampler's seed (torch's default 0).
  """
  slots = E_tilde + 1
  # Per process, slot and row: the epoch and the example whose logits were written there.
  written_epoch = np.full((processes, slots, num_examples), -1, np.int16)
  written_example = np.full((processes, slots, num_examples), -1, np.int32)
  per_rank = -(-num_examples // processes)  # ceil: DistributedSampler.num_samples.
  counts = dict.fromkeys(CLASSES, 0)
  for epoch in range(epochs):
    order = np.random.default_rng(seed + epoch).permutation(num_examples)
    order = np.concatenate([order, order[: per_rank * processes - num_examples]])
    for rank in range(processes):
      images = order[rank::processes]
      images = images[: len(images) // batch_size * batch_size]  # drop_last=True.
      ids = images
      if prefetcher:  # Batch k's images with batch k + 1's indices; the last with its own.
        ids = np.concatenate([images[batch_size:], images[-batch_size:]])
      if epoch > kl_start_epoch:
        read = (epoch - E_tilde) % slots
        ep = written_epoch[rank, read, ids]
        same = written_example[rank, read, ids] == images
        counts['zero_row'] += int(np.sum(ep < 0))
        counts['right'] += int(np.sum(same & (ep == epoch - E_tilde)))
        counts['older'] += int(np.sum(same & (ep != epoch - E_tilde)))
        counts['other_example'] += int(np.sum((ep >= 0) & ~same))
      write = epoch % slots
      # In batch order: with the prefetcher the last batch's rows are written twice, and
      # the last batch's own images are written last.
      written_epoch[rank, write, ids[:-batch_size]] = epoch
      written_example[rank, write, ids[:-batch_size]] = images[:-batch_size]
      written_epoch[rank, write, ids[-batch_size:]] = epoch
      written_example[rank, write, ids[-batch_size:]] = images[-batch_size:]
  total = sum(counts.values())
  return {name: count / total for name, count in counts.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num-examples', type=int, default=50_000)
  parser.add_argument('--processes', default='1,4,8')
  parser.add_argument('--e-tilde', default='2,3')
  args = parser.parse_args()
  print(
    f'N={args.num_examples}, batch 256 per process, 100 epochs (90 + 10 cool-down), '
    'kl_start_epoch=5: shares of the targets read in epochs 6-99 (0-based)'
  )
  print(f'{"prefetcher":>10} {"R":>2} {"E~":>2}  ' + '  '.join(f'{c:>13}' for c in CLASSES))
  for prefetcher in (False, True):
    for processes in map(int, args.processes.split(',')):
      for E_tilde in map(int, args.e_tilde.split(',')):
        shares = simulate(args.num_examples, processes, E_tilde, prefetcher=prefetcher)
        print(
          f'{str(prefetcher):>10} {processes:>2} {E_tilde:>2}  '
          + '  '.join(f'{shares[c]:>13.4f}' for c in CLASSES)
        )


if __name__ == '__main__':
  main()
