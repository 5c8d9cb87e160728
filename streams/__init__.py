"""streams — data in: sources, tokenizer, packing, held-out split, cursors, staging.

Knows text and tokens, never a model; never imports ``lifelong`` or ``expert_store``.
Importing it has no side effects and does not import ``datasets`` (loaded on first read).
"""
from __future__ import annotations

from .cursor import Cursor, FileCursor
from .defaults import DEFAULT_STREAMS, default_sources, register_defaults
from .errors import (BadInputError, BinaryFileError, BlankFileError, ChangedFileError,
                     CursorError, EmptyFileError, EncodingError, FieldTypeError,
                     MalformedFileError, MalformedJSONError, MissingFieldError,
                     NotAnObjectError, SourceError, SourceNotFoundError, SourceUnavailableError,
                     SpecError, StreamError, StreamExistsError, StreamNameError,
                     StreamNotFoundError, StreamWriteError, TokenizerError, UnreadableFileError,
                     VanishedFileError)
from .packing import BlockPacker, pack_blocks, pack_documents
from .registry import StreamRegistry
from .result import FileReport, HeldOut, IngestResult, Pending, StagedInfo, StreamInfo
from .spec import StreamSpec, validate_name
from .split import HELDOUT_SPLITS, doc_hash, is_heldout, split_document
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "StreamRegistry", "StreamSpec", "validate_name",
    "IngestResult", "FileReport", "Pending", "HeldOut", "StagedInfo", "StreamInfo",
    "Cursor", "FileCursor",
    "ByteTokenizer", "HFTokenizer", "load_tokenizer", "EOS_ID", "PAD_ID", "BOS_ID",
    "pack_blocks", "pack_documents", "BlockPacker",
    "doc_hash", "is_heldout", "split_document", "HELDOUT_SPLITS",
    "DEFAULT_STREAMS", "default_sources", "register_defaults",
    "StreamError", "StreamNameError", "StreamExistsError", "StreamNotFoundError", "SpecError",
    "StreamWriteError",
    "CursorError", "TokenizerError", "SourceError", "SourceNotFoundError",
    "SourceUnavailableError", "ChangedFileError", "BadInputError", "MalformedFileError",
    "MalformedJSONError", "NotAnObjectError", "EncodingError", "MissingFieldError", "FieldTypeError",
    "BinaryFileError", "EmptyFileError", "BlankFileError", "UnreadableFileError",
    "VanishedFileError",
]
