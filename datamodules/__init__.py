"""Data: LightningDataModules, WebDataset streaming, shard writing, media I/O and the synthetic shapes world.

media.py             PyAV decode/encode of video, audio and images (the one module that writes media files)
shards.py            shard files: specs -> tar URLs (paths, brace lists, folders, pipe:, http), checks, sample
                     counts, reading one tar shard (nothing unpickled), ShardCache (read shards kept in memory)
memory.py            MemoryLRU: the byte-bounded in-memory store of ShardCache and samples.ClipCache
shard_schedule.py    node/rank/worker split: each slot's seeded shard schedule, default epoch length, rank/world
sources.py           what the stream needs from a modality: Source, SampleHandler, Bucket, SkipSample
stream_dataset.py    the worker side: shuffle buffer, per-bucket batching, source mixing, bad-sample accounting
stream_loader.py     the main-process side: ShardLoader (fixed batches per epoch), ResumableShardLoader (exact
                     position in checkpoints)
shard_datamodule.py  ShardDataModule, the base of video.py (VideoDataModule, AudioVideoDataModule), image.py
                     (ImageDataModule), audio.py (AudioDataModule) and latents.py (LatentDataModule)
samples.py           per-modality handlers: bucket by metadata, decode in workers, collate
write_shards.py      folder of media + captions -> shards (+ index.json); the synthetic world -> shards
latent_cache.py      the TAE latent-cache format: its writer (encode_shards, encode_cache) and its reader
latents.py           LatentDataModule: text-to-video batches from a latent cache
text_cache.py        the text-embedding cache of a frozen text encoder: its writer (encode_texts) and reader
parts.py             data preparation by parts (ranks, SLURM array tasks): which part, its folder, the merge
synthetic/           the shapes world: scenes, images, identities, edit pairs, stickers with exact ground truth
digits.py            scikit-learn's digits for the classifier / DP experiments
"""
