"""Data: LightningDataModules, WebDataset streaming, shard writing, media I/O and the synthetic shapes world.

media.py         PyAV decode/encode of video, audio and images (the one module that writes media files)
shards.py        the streaming pipeline: shard lists, node/worker split, seeded shuffles, buckets, bad-sample
                 accounting, resumable loader (exact position)
samples.py       per-modality handlers: bucket by metadata, decode in workers, collate
write_shards.py  folder of media + captions -> shards (+ index.json); the synthetic world -> shards
streaming.py     ShardDataModule, the base of video.py (VideoDataModule, AudioVideoDataModule), image.py
                 (ImageDataModule) and audio.py (AudioDataModule)
synthetic/       the shapes world: scenes, images, identities, edit pairs, stickers with exact ground truth
digits.py        scikit-learn's digits for the classifier / DP experiments
"""
