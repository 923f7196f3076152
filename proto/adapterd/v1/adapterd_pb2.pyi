from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StopReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NOT_FINISHED: _ClassVar[StopReason]
    MAX_TOKENS: _ClassVar[StopReason]
    EOS_TOKEN: _ClassVar[StopReason]
    STOP_SEQUENCE: _ClassVar[StopReason]
    TIME_LIMIT: _ClassVar[StopReason]
    CANCELLED: _ClassVar[StopReason]
    TOKEN_LIMIT: _ClassVar[StopReason]
    ERROR: _ClassVar[StopReason]

class AdapterType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_TYPE_UNSPECIFIED: _ClassVar[AdapterType]
    LORA: _ClassVar[AdapterType]
    PREFIX_TUNING: _ClassVar[AdapterType]

class AdapterState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_STATE_UNSPECIFIED: _ClassVar[AdapterState]
    ON_DISK: _ClassVar[AdapterState]
    LOADING: _ClassVar[AdapterState]
    RESIDENT_GPU: _ClassVar[AdapterState]
    RESIDENT_CPU: _ClassVar[AdapterState]
    LOAD_FAILED: _ClassVar[AdapterState]

class MergeStrategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MERGE_STRATEGY_UNSPECIFIED: _ClassVar[MergeStrategy]
    LINEAR: _ClassVar[MergeStrategy]
    CAT: _ClassVar[MergeStrategy]
    SVD: _ClassVar[MergeStrategy]
    TIES: _ClassVar[MergeStrategy]
    DARE_LINEAR: _ClassVar[MergeStrategy]
    DARE_TIES: _ClassVar[MergeStrategy]

class TrainingState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAINING_STATE_UNSPECIFIED: _ClassVar[TrainingState]
    PENDING: _ClassVar[TrainingState]
    RUNNING: _ClassVar[TrainingState]
    COMPLETED: _ClassVar[TrainingState]
    FAILED: _ClassVar[TrainingState]
    STOPPED: _ClassVar[TrainingState]
NOT_FINISHED: StopReason
MAX_TOKENS: StopReason
EOS_TOKEN: StopReason
STOP_SEQUENCE: StopReason
TIME_LIMIT: StopReason
CANCELLED: StopReason
TOKEN_LIMIT: StopReason
ERROR: StopReason
ADAPTER_TYPE_UNSPECIFIED: AdapterType
LORA: AdapterType
PREFIX_TUNING: AdapterType
ADAPTER_STATE_UNSPECIFIED: AdapterState
ON_DISK: AdapterState
LOADING: AdapterState
RESIDENT_GPU: AdapterState
RESIDENT_CPU: AdapterState
LOAD_FAILED: AdapterState
MERGE_STRATEGY_UNSPECIFIED: MergeStrategy
LINEAR: MergeStrategy
CAT: MergeStrategy
SVD: MergeStrategy
TIES: MergeStrategy
DARE_LINEAR: MergeStrategy
DARE_TIES: MergeStrategy
TRAINING_STATE_UNSPECIFIED: TrainingState
PENDING: TrainingState
RUNNING: TrainingState
COMPLETED: TrainingState
FAILED: TrainingState
STOPPED: TrainingState

class SamplingParameters(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed", "repetition_penalty")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    repetition_penalty: float
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., repetition_penalty: _Optional[float] = ...) -> None: ...

class StoppingCriteria(_message.Message):
    __slots__ = ("max_new_tokens", "min_new_tokens", "stop_sequences", "include_stop_sequence", "time_limit_ms")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MIN_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_STOP_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_LIMIT_MS_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    min_new_tokens: int
    stop_sequences: _containers.RepeatedScalarFieldContainer[str]
    include_stop_sequence: bool
    time_limit_ms: int
    def __init__(self, max_new_tokens: _Optional[int] = ..., min_new_tokens: _Optional[int] = ..., stop_sequences: _Optional[_Iterable[str]] = ..., include_stop_sequence: _Optional[bool] = ..., time_limit_ms: _Optional[int] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "adapter_id", "sampling", "stopping", "truncate_input_tokens", "messages", "prompt_token_ids")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    adapter_id: str
    sampling: SamplingParameters
    stopping: StoppingCriteria
    truncate_input_tokens: int
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, prompt: _Optional[str] = ..., adapter_id: _Optional[str] = ..., sampling: _Optional[_Union[SamplingParameters, _Mapping]] = ..., stopping: _Optional[_Union[StoppingCriteria, _Mapping]] = ..., truncate_input_tokens: _Optional[int] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "adapter_id", "input_token_count", "generated_token_count", "stop_reason", "stop_sequence", "seed")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    text: str
    adapter_id: str
    input_token_count: int
    generated_token_count: int
    stop_reason: StopReason
    stop_sequence: str
    seed: int
    def __init__(self, text: _Optional[str] = ..., adapter_id: _Optional[str] = ..., input_token_count: _Optional[int] = ..., generated_token_count: _Optional[int] = ..., stop_reason: _Optional[_Union[StopReason, str]] = ..., stop_sequence: _Optional[str] = ..., seed: _Optional[int] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("text", "return_tokens", "messages", "adapter_id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    RETURN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    return_tokens: bool
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    adapter_id: str
    def __init__(self, text: _Optional[str] = ..., return_tokens: _Optional[bool] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., adapter_id: _Optional[str] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("token_count", "token_ids", "tokens", "rendered_prompt")
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    RENDERED_PROMPT_FIELD_NUMBER: _ClassVar[int]
    token_count: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    rendered_prompt: str
    def __init__(self, token_count: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[str]] = ..., rendered_prompt: _Optional[str] = ...) -> None: ...

class AdapterInfo(_message.Message):
    __slots__ = ("adapter_id", "type", "rank", "num_virtual_tokens", "target_modules", "size_bytes", "state", "last_used_unix", "base_model", "error")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    NUM_VIRTUAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_UNIX_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    type: AdapterType
    rank: int
    num_virtual_tokens: int
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    size_bytes: int
    state: AdapterState
    last_used_unix: float
    base_model: str
    error: str
    def __init__(self, adapter_id: _Optional[str] = ..., type: _Optional[_Union[AdapterType, str]] = ..., rank: _Optional[int] = ..., num_virtual_tokens: _Optional[int] = ..., target_modules: _Optional[_Iterable[str]] = ..., size_bytes: _Optional[int] = ..., state: _Optional[_Union[AdapterState, str]] = ..., last_used_unix: _Optional[float] = ..., base_model: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterInfo]
    def __init__(self, adapters: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ...) -> None: ...

class LoadAdapterRequest(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class UnloadAdapterRequest(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfoResponse(_message.Message):
    __slots__ = ("base_model", "model_type", "quantization", "dtype", "device", "max_sequence_length", "max_new_tokens", "max_batch_size", "max_lora_rank", "adapter_slots", "version", "vocab_size")
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SLOTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    model_type: str
    quantization: str
    dtype: str
    device: str
    max_sequence_length: int
    max_new_tokens: int
    max_batch_size: int
    max_lora_rank: int
    adapter_slots: int
    version: str
    vocab_size: int
    def __init__(self, base_model: _Optional[str] = ..., model_type: _Optional[str] = ..., quantization: _Optional[str] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., max_sequence_length: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., max_lora_rank: _Optional[int] = ..., adapter_slots: _Optional[int] = ..., version: _Optional[str] = ..., vocab_size: _Optional[int] = ...) -> None: ...

class WeightedAdapter(_message.Message):
    __slots__ = ("adapter_id", "weight")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    weight: float
    def __init__(self, adapter_id: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class MergeAdapterRequest(_message.Message):
    __slots__ = ("adapters", "output_model_dir", "output_adapter_id", "strategy", "density", "majority_sign_method", "seed", "rank", "overwrite")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_MODEL_DIR_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    MAJORITY_SIGN_METHOD_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[WeightedAdapter]
    output_model_dir: str
    output_adapter_id: str
    strategy: MergeStrategy
    density: float
    majority_sign_method: str
    seed: int
    rank: int
    overwrite: bool
    def __init__(self, adapters: _Optional[_Iterable[_Union[WeightedAdapter, _Mapping]]] = ..., output_model_dir: _Optional[str] = ..., output_adapter_id: _Optional[str] = ..., strategy: _Optional[_Union[MergeStrategy, str]] = ..., density: _Optional[float] = ..., majority_sign_method: _Optional[str] = ..., seed: _Optional[int] = ..., rank: _Optional[int] = ..., overwrite: _Optional[bool] = ...) -> None: ...

class MergeProgress(_message.Message):
    __slots__ = ("tensors_done", "tensors_total", "done", "output", "bytes_written")
    TENSORS_DONE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    tensors_done: int
    tensors_total: int
    done: bool
    output: str
    bytes_written: int
    def __init__(self, tensors_done: _Optional[int] = ..., tensors_total: _Optional[int] = ..., done: _Optional[bool] = ..., output: _Optional[str] = ..., bytes_written: _Optional[int] = ...) -> None: ...

class StartTrainingRequest(_message.Message):
    __slots__ = ("data_path", "method", "run_id", "options", "export_adapter_id")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DATA_PATH_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    EXPORT_ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    data_path: str
    method: str
    run_id: str
    options: _containers.ScalarMap[str, str]
    export_adapter_id: str
    def __init__(self, data_path: _Optional[str] = ..., method: _Optional[str] = ..., run_id: _Optional[str] = ..., options: _Optional[_Mapping[str, str]] = ..., export_adapter_id: _Optional[str] = ...) -> None: ...

class StopTrainingRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class TrainStatusRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class GpuStatus(_message.Message):
    __slots__ = ("index", "memory_used_bytes", "memory_peak_bytes", "memory_total_bytes", "utilization", "temperature_celsius")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_CELSIUS_FIELD_NUMBER: _ClassVar[int]
    index: int
    memory_used_bytes: int
    memory_peak_bytes: int
    memory_total_bytes: int
    utilization: float
    temperature_celsius: float
    def __init__(self, index: _Optional[int] = ..., memory_used_bytes: _Optional[int] = ..., memory_peak_bytes: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., utilization: _Optional[float] = ..., temperature_celsius: _Optional[float] = ...) -> None: ...

class TrainingRun(_message.Message):
    __slots__ = ("run_id", "state", "method", "step", "total_steps", "epoch", "loss", "smoothed_loss", "learning_rate", "tokens_per_second", "elapsed_seconds", "eta_seconds", "last_checkpoint", "error", "gpus", "updated_unix", "output_dir", "eval_loss", "skipped_records", "final_adapter", "exported_to")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SMOOTHED_LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DIR_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_RECORDS_FIELD_NUMBER: _ClassVar[int]
    FINAL_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    EXPORTED_TO_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    state: TrainingState
    method: str
    step: int
    total_steps: int
    epoch: float
    loss: float
    smoothed_loss: float
    learning_rate: float
    tokens_per_second: float
    elapsed_seconds: float
    eta_seconds: float
    last_checkpoint: str
    error: str
    gpus: _containers.RepeatedCompositeFieldContainer[GpuStatus]
    updated_unix: float
    output_dir: str
    eval_loss: float
    skipped_records: int
    final_adapter: str
    exported_to: str
    def __init__(self, run_id: _Optional[str] = ..., state: _Optional[_Union[TrainingState, str]] = ..., method: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., epoch: _Optional[float] = ..., loss: _Optional[float] = ..., smoothed_loss: _Optional[float] = ..., learning_rate: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., elapsed_seconds: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., last_checkpoint: _Optional[str] = ..., error: _Optional[str] = ..., gpus: _Optional[_Iterable[_Union[GpuStatus, _Mapping]]] = ..., updated_unix: _Optional[float] = ..., output_dir: _Optional[str] = ..., eval_loss: _Optional[float] = ..., skipped_records: _Optional[int] = ..., final_adapter: _Optional[str] = ..., exported_to: _Optional[str] = ...) -> None: ...

class TrainStatusResponse(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[TrainingRun]
    def __init__(self, runs: _Optional[_Iterable[_Union[TrainingRun, _Mapping]]] = ...) -> None: ...
