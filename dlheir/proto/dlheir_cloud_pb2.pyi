from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CollectionMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVER_RANKED: _ClassVar[CollectionMode]
    PRIVATE_RANKING: _ClassVar[CollectionMode]
SERVER_RANKED: CollectionMode
PRIVATE_RANKING: CollectionMode

class ListFrontsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FrontInfo(_message.Message):
    __slots__ = ("id", "address", "host", "pid", "started", "applied", "seen")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    SEEN_FIELD_NUMBER: _ClassVar[int]
    id: str
    address: str
    host: str
    pid: int
    started: float
    applied: int
    seen: float
    def __init__(self, id: _Optional[str] = ..., address: _Optional[str] = ..., host: _Optional[str] = ..., pid: _Optional[int] = ..., started: _Optional[float] = ..., applied: _Optional[int] = ..., seen: _Optional[float] = ...) -> None: ...

class ListFrontsResponse(_message.Message):
    __slots__ = ("shared", "head", "answered_by", "fronts")
    SHARED_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_BY_FIELD_NUMBER: _ClassVar[int]
    FRONTS_FIELD_NUMBER: _ClassVar[int]
    shared: bool
    head: int
    answered_by: str
    fronts: _containers.RepeatedCompositeFieldContainer[FrontInfo]
    def __init__(self, shared: _Optional[bool] = ..., head: _Optional[int] = ..., answered_by: _Optional[str] = ..., fronts: _Optional[_Iterable[_Union[FrontInfo, _Mapping]]] = ...) -> None: ...

class CreateCollectionRequest(_message.Message):
    __slots__ = ("name", "bits", "mode", "model_fingerprint", "image_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    bits: int
    mode: CollectionMode
    model_fingerprint: str
    image_size: int
    def __init__(self, name: _Optional[str] = ..., bits: _Optional[int] = ..., mode: _Optional[_Union[CollectionMode, str]] = ..., model_fingerprint: _Optional[str] = ..., image_size: _Optional[int] = ...) -> None: ...

class CreateCollectionResponse(_message.Message):
    __slots__ = ("owner_token", "reader_token")
    OWNER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    READER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    owner_token: str
    reader_token: str
    def __init__(self, owner_token: _Optional[str] = ..., reader_token: _Optional[str] = ...) -> None: ...

class ListCollectionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CollectionInfo(_message.Message):
    __slots__ = ("name", "bits", "items", "blob_bytes", "mode", "code_pages", "code_page_bytes", "key_id", "model_fingerprint", "image_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    BLOB_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CODE_PAGES_FIELD_NUMBER: _ClassVar[int]
    CODE_PAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    bits: int
    items: int
    blob_bytes: int
    mode: CollectionMode
    code_pages: int
    code_page_bytes: int
    key_id: int
    model_fingerprint: str
    image_size: int
    def __init__(self, name: _Optional[str] = ..., bits: _Optional[int] = ..., items: _Optional[int] = ..., blob_bytes: _Optional[int] = ..., mode: _Optional[_Union[CollectionMode, str]] = ..., code_pages: _Optional[int] = ..., code_page_bytes: _Optional[int] = ..., key_id: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., image_size: _Optional[int] = ...) -> None: ...

class ListCollectionsResponse(_message.Message):
    __slots__ = ("collections",)
    COLLECTIONS_FIELD_NUMBER: _ClassVar[int]
    collections: _containers.RepeatedCompositeFieldContainer[CollectionInfo]
    def __init__(self, collections: _Optional[_Iterable[_Union[CollectionInfo, _Mapping]]] = ...) -> None: ...

class CollectionRequest(_message.Message):
    __slots__ = ("collection",)
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    collection: str
    def __init__(self, collection: _Optional[str] = ...) -> None: ...

class CollectionStatsResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: CollectionInfo
    def __init__(self, info: _Optional[_Union[CollectionInfo, _Mapping]] = ...) -> None: ...

class DeleteCollectionResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: CollectionInfo
    def __init__(self, info: _Optional[_Union[CollectionInfo, _Mapping]] = ...) -> None: ...

class UploadItem(_message.Message):
    __slots__ = ("id", "code", "blob", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: int
    code: bytes
    blob: bytes
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[int] = ..., code: _Optional[bytes] = ..., blob: _Optional[bytes] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class UploadBatch(_message.Message):
    __slots__ = ("collection", "items", "replace", "model_fingerprint", "key_id")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    collection: str
    items: _containers.RepeatedCompositeFieldContainer[UploadItem]
    replace: bool
    model_fingerprint: str
    key_id: int
    def __init__(self, collection: _Optional[str] = ..., items: _Optional[_Iterable[_Union[UploadItem, _Mapping]]] = ..., replace: _Optional[bool] = ..., model_fingerprint: _Optional[str] = ..., key_id: _Optional[int] = ...) -> None: ...

class UploadAck(_message.Message):
    __slots__ = ("batch", "ids", "total_items")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ITEMS_FIELD_NUMBER: _ClassVar[int]
    batch: int
    ids: _containers.RepeatedScalarFieldContainer[int]
    total_items: int
    def __init__(self, batch: _Optional[int] = ..., ids: _Optional[_Iterable[int]] = ..., total_items: _Optional[int] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("collection", "codes", "k", "max_distance", "model_fingerprint", "packed")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    MAX_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    collection: str
    codes: _containers.RepeatedScalarFieldContainer[bytes]
    k: int
    max_distance: int
    model_fingerprint: str
    packed: bool
    def __init__(self, collection: _Optional[str] = ..., codes: _Optional[_Iterable[bytes]] = ..., k: _Optional[int] = ..., max_distance: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., packed: _Optional[bool] = ...) -> None: ...

class SearchResult(_message.Message):
    __slots__ = ("ids", "distances")
    IDS_FIELD_NUMBER: _ClassVar[int]
    DISTANCES_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    distances: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., distances: _Optional[_Iterable[int]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("results", "counts", "ids", "distances")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    DISTANCES_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SearchResult]
    counts: _containers.RepeatedScalarFieldContainer[int]
    ids: bytes
    distances: bytes
    def __init__(self, results: _Optional[_Iterable[_Union[SearchResult, _Mapping]]] = ..., counts: _Optional[_Iterable[int]] = ..., ids: _Optional[bytes] = ..., distances: _Optional[bytes] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("collection", "ids")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, collection: _Optional[str] = ..., ids: _Optional[_Iterable[int]] = ...) -> None: ...

class FetchedItem(_message.Message):
    __slots__ = ("id", "blob", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: int
    blob: bytes
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[int] = ..., blob: _Optional[bytes] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("collection", "ids")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, collection: _Optional[str] = ..., ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class ContainsRequest(_message.Message):
    __slots__ = ("collection", "ids")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, collection: _Optional[str] = ..., ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ContainsResponse(_message.Message):
    __slots__ = ("present",)
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    present: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, present: _Optional[_Iterable[int]] = ...) -> None: ...

class AddReaderRequest(_message.Message):
    __slots__ = ("collection", "user", "replace")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    collection: str
    user: str
    replace: bool
    def __init__(self, collection: _Optional[str] = ..., user: _Optional[str] = ..., replace: _Optional[bool] = ...) -> None: ...

class AddReaderResponse(_message.Message):
    __slots__ = ("token", "created")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    token: str
    created: float
    def __init__(self, token: _Optional[str] = ..., created: _Optional[float] = ...) -> None: ...

class ReaderInfo(_message.Message):
    __slots__ = ("user", "created", "revoked")
    USER_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    user: str
    created: float
    revoked: float
    def __init__(self, user: _Optional[str] = ..., created: _Optional[float] = ..., revoked: _Optional[float] = ...) -> None: ...

class ListReadersResponse(_message.Message):
    __slots__ = ("readers", "shared_token_active", "key_id")
    READERS_FIELD_NUMBER: _ClassVar[int]
    SHARED_TOKEN_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    readers: _containers.RepeatedCompositeFieldContainer[ReaderInfo]
    shared_token_active: bool
    key_id: int
    def __init__(self, readers: _Optional[_Iterable[_Union[ReaderInfo, _Mapping]]] = ..., shared_token_active: _Optional[bool] = ..., key_id: _Optional[int] = ...) -> None: ...

class RevokeReaderRequest(_message.Message):
    __slots__ = ("collection", "user", "shared_token")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    SHARED_TOKEN_FIELD_NUMBER: _ClassVar[int]
    collection: str
    user: str
    shared_token: bool
    def __init__(self, collection: _Optional[str] = ..., user: _Optional[str] = ..., shared_token: _Optional[bool] = ...) -> None: ...

class RevokeReaderResponse(_message.Message):
    __slots__ = ("revoked",)
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    revoked: bool
    def __init__(self, revoked: _Optional[bool] = ...) -> None: ...

class RekeyCodesRequest(_message.Message):
    __slots__ = ("collection", "from_key_id", "to_key_id", "perm", "mask")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    FROM_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TO_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PERM_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    collection: str
    from_key_id: int
    to_key_id: int
    perm: _containers.RepeatedScalarFieldContainer[int]
    mask: bytes
    def __init__(self, collection: _Optional[str] = ..., from_key_id: _Optional[int] = ..., to_key_id: _Optional[int] = ..., perm: _Optional[_Iterable[int]] = ..., mask: _Optional[bytes] = ...) -> None: ...

class RekeyCodesResponse(_message.Message):
    __slots__ = ("items", "revoked_users")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_USERS_FIELD_NUMBER: _ClassVar[int]
    items: int
    revoked_users: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, items: _Optional[int] = ..., revoked_users: _Optional[_Iterable[str]] = ...) -> None: ...

class StageCodesRequest(_message.Message):
    __slots__ = ("collection", "model_fingerprint", "key_id", "ids", "codes")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    collection: str
    model_fingerprint: str
    key_id: int
    ids: _containers.RepeatedScalarFieldContainer[int]
    codes: bytes
    def __init__(self, collection: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., key_id: _Optional[int] = ..., ids: _Optional[_Iterable[int]] = ..., codes: _Optional[bytes] = ...) -> None: ...

class StageCodesResponse(_message.Message):
    __slots__ = ("staged",)
    STAGED_FIELD_NUMBER: _ClassVar[int]
    staged: int
    def __init__(self, staged: _Optional[int] = ...) -> None: ...

class UnstagedIdsRequest(_message.Message):
    __slots__ = ("collection", "model_fingerprint", "after_id", "limit")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    collection: str
    model_fingerprint: str
    after_id: int
    limit: int
    def __init__(self, collection: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., after_id: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class UnstagedIdsResponse(_message.Message):
    __slots__ = ("ids", "items", "staged")
    IDS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    STAGED_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    items: int
    staged: int
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., items: _Optional[int] = ..., staged: _Optional[int] = ...) -> None: ...

class SwitchCodesRequest(_message.Message):
    __slots__ = ("collection", "model_fingerprint", "image_size", "key_id")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    collection: str
    model_fingerprint: str
    image_size: int
    key_id: int
    def __init__(self, collection: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., image_size: _Optional[int] = ..., key_id: _Optional[int] = ...) -> None: ...

class SwitchCodesResponse(_message.Message):
    __slots__ = ("items", "previous_fingerprint")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    items: int
    previous_fingerprint: str
    def __init__(self, items: _Optional[int] = ..., previous_fingerprint: _Optional[str] = ...) -> None: ...

class AppendCodePageRequest(_message.Message):
    __slots__ = ("collection", "page", "data")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    collection: str
    page: int
    data: bytes
    def __init__(self, collection: _Optional[str] = ..., page: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class AppendCodePageResponse(_message.Message):
    __slots__ = ("pages",)
    PAGES_FIELD_NUMBER: _ClassVar[int]
    pages: int
    def __init__(self, pages: _Optional[int] = ...) -> None: ...

class SyncCodePagesRequest(_message.Message):
    __slots__ = ("collection", "from_page")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    FROM_PAGE_FIELD_NUMBER: _ClassVar[int]
    collection: str
    from_page: int
    def __init__(self, collection: _Optional[str] = ..., from_page: _Optional[int] = ...) -> None: ...

class SyncHeader(_message.Message):
    __slots__ = ("mode", "bits", "pages", "page_bytes", "model_fingerprint", "image_size")
    MODE_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    PAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    mode: CollectionMode
    bits: int
    pages: int
    page_bytes: int
    model_fingerprint: str
    image_size: int
    def __init__(self, mode: _Optional[_Union[CollectionMode, str]] = ..., bits: _Optional[int] = ..., pages: _Optional[int] = ..., page_bytes: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., image_size: _Optional[int] = ...) -> None: ...

class CodePage(_message.Message):
    __slots__ = ("page", "data")
    PAGE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    page: int
    data: bytes
    def __init__(self, page: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class SyncCodePagesResponse(_message.Message):
    __slots__ = ("header", "page")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    header: SyncHeader
    page: CodePage
    def __init__(self, header: _Optional[_Union[SyncHeader, _Mapping]] = ..., page: _Optional[_Union[CodePage, _Mapping]] = ...) -> None: ...
