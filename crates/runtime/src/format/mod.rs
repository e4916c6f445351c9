//! The FP4 on-disk layouts: tensor names, dtypes, shapes and config JSON, for writer and reader alike.
