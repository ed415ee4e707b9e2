"""Pydantic models of the endpoint's request and response (../shared/api/openapi.yaml).

Enum-like fields are plain strings: the vendor documents one example value each, not the set.
Request models forbid unknown fields, so that a misspelt field in an export is reported
instead of silently dropped; free-form objects (`metaData`, `value`, ...) take anything.
Response models ignore unknown fields, and malformed items in their lists (a warning that is
not an object, an id that is not a string): the server may add or garble details, and one
odd warning must not turn an explicit success into an unreadable answer.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, NotRequired

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    with_config,
)
from typing_extensions import TypedDict


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True, defer_build=True)


class DraftAttributes(_Request):
    draftStatus: str | None = None
    scheduledOn: str | None = None
    draftFailureReason: str | None = None


class Attachment(_Request):
    fileURL: str | None = None
    attachmentExtension: str | None = None
    mimeType: str | None = None
    originalFileName: str | None = None
    docSize: str | None = None
    thumbnailURL: str | None = None
    mediaPreviewURL: str | None = None


class TagValue(_Request):
    value: str | None = None


class ParentTag(_Request):
    tagTypeUuid: str | None = None
    referenceIdentifier: str | None = None


class MessageTag(_Request):
    tagTypeUuid: str | None = None
    referenceIdentifier: str | None = None
    value: dict[str, Any] | None = None
    primaryAttribute: TagValue | None = None
    secondaryAttributes: list[TagValue] | None = None
    parentTags: list[ParentTag] | None = None


class MessageAttributes(_Request):
    body: str | None = None
    type: str | None = None
    protocol: str | None = None
    purpose: str | None = None
    isManual: bool | None = None
    subject: str | None = None
    metaData: dict[str, Any] | None = None
    tags: list[str] | None = None
    draftAttributes: DraftAttributes | None = None
    attachments: list[Attachment] | None = None
    defaultReplyAction: str | None = None
    updateThreadTimestamp: bool | None = None
    updateTotalMessageCount: bool | None = None
    showInCustomerConversation: bool | None = None
    messageTags: list[MessageTag] | None = None


class NotificationButton(_Request):
    buttonTextTranslationWidgetKey: str | None = None
    buttonTextTranslationKey: str | None = None
    buttonDefaultText: str | None = None
    buttonTheme: str | None = None
    buttonActionEventData: dict[str, Any] | None = None
    isPrimaryButton: bool | None = None


NOTIFIER_FLAGS = (
    "internalSubscribersNotifierPop",
    "externalSubscribersNotifierPop",
    "threadOwnerNotifierPop",
    "sendPhoneNotification",
)


class NotificationAttributes(_Request):
    internalSubscribersNotifierPop: bool | None = None
    externalSubscribersNotifierPop: bool | None = None
    threadOwnerNotifierPop: bool | None = None
    sendPhoneNotification: bool | None = None
    additionalNotifierNotificationDAUUIDs: list[str] | None = None
    notificationButtons: list[NotificationButton] | None = None


class VoiceCallAttributes(_Request):
    callingParty: str | None = None
    party2: str | None = None
    party1Prompt: str | None = None
    party2prompt: str | None = None
    callStatus: int | None = None
    callIdentifier: str | None = None
    callDateTime: str | None = None
    callBroker: str | None = None
    recordingUrl: str | None = None
    recordCall: bool | None = None
    transcribeCall: bool | None = None
    transcribeText: str | None = None


class SaveMessageRequest(_Request):
    """One message of a request: the API's message object."""

    sourceUuid: str | None = None
    callBackPathUrl: str | None = None
    sentOn: str | None = None
    receivedOn: str | None = None
    userUuid: str | None = None
    messageUuid: str | None = None
    communicationUid: str | None = None
    messageAttributes: MessageAttributes | None = None
    notificationAttributes: NotificationAttributes | None = None
    voiceCallAttributes: VoiceCallAttributes | None = None


def message_adapter() -> TypeAdapter[dict[str, Any]]:
    """A validator of one message, the rules of SaveMessageRequest applied to a plain dict.

    Pydantic checks a TypedDict with the same field types, the same `extra="forbid"` and the
    same error types and locations as the model, without building a model instance per
    object: about 60% of the model's time on a typical message. Derived from the models,
    so that the two cannot drift apart (tests/test_properties.py compares them)."""
    return TypeAdapter(_typed_dict(SaveMessageRequest, {}))


def _typed_dict(model: type[BaseModel], done: dict[type[BaseModel], Any]) -> Any:
    """A TypedDict with the model's fields, aliases and configuration; the fields'
    validators (the leniency of the response models) are left out."""
    if model not in done:
        fields = {}
        for name, field in model.model_fields.items():
            annotation = _plain(field.annotation, done)
            if field.validation_alias is not None:
                annotation = Annotated[annotation, Field(validation_alias=field.validation_alias)]
            fields[name] = NotRequired[annotation]
        typed = TypedDict(model.__name__, fields)  # type: ignore[misc]
        done[model] = with_config(ConfigDict(**model.model_config))(typed)
    return done[model]


def _plain(annotation: Any, done: dict[type[BaseModel], Any]) -> Any:
    """An annotation with every model in it replaced by its TypedDict."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _typed_dict(annotation, done)
    origin = typing.get_origin(annotation)
    if origin is None:
        return annotation
    args = tuple(_plain(a, done) for a in typing.get_args(annotation))
    if origin is types.UnionType or origin is typing.Union:
        return typing.Union[args]  # noqa: UP007
    return origin[args]


class SaveMessageRequestBody(_Request):
    saveMessageRequestList: list[SaveMessageRequest]
    callBackPathUrl: str | None = None


def _objects(value: Any) -> Any:
    """Keep the objects of a list; anything but a list is as good as absent."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else None


def _strings(value: Any) -> Any:
    """Keep the strings of a list, so that a stray item does not hide the rest."""
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else value


class ApiError(_Response):
    errorCode: str | None = None
    errorDescription: str | None = None
    errorUID: str | None = None


class ApiWarning(_Response):
    warningCode: str | None = None
    warningDescription: str | None = None


Errors = Annotated[list[ApiError] | None, BeforeValidator(_objects)]
Warnings = Annotated[list[ApiWarning] | None, BeforeValidator(_objects)]
Ids = Annotated[list[str] | None, BeforeValidator(_strings)]


class SaveMessageResponse(_Response):
    sourceUuid: str | None = None
    messageUuid: str | None = None
    errors: Errors = None
    warnings: Warnings = None


class SaveMessageResponseBody(_Response):
    """The 200 answer. The vendor spells the success list with one "s"; both are read."""

    saveMessageResponse: Annotated[list[SaveMessageResponse] | None, BeforeValidator(_objects)] = (
        None
    )
    succesfullySubmittedSourceUuids: Ids = Field(
        default=None,
        validation_alias=AliasChoices(
            "succesfullySubmittedSourceUuids", "successfullySubmittedSourceUuids"
        ),
    )
    failedSourceUuids: Ids = None
    errors: Errors = None
    warnings: Warnings = None


Answer = dict[str, Any]
"""A 200 answer as plain data: SaveMessageResponseBody's fields, absent or None when the
answer left them out; lists hold dicts (entries, errors, warnings) and strings (ids)."""

_answer_adapter: TypeAdapter[Answer] | None = None


_BOM = b"\xef\xbb\xbf"


def read_answer(content: bytes) -> Answer:
    """Read a 200 answer; ValidationError when it is not the documented JSON object.

    A well-formed answer is read by the TypedDict twin of SaveMessageResponseBody (no model
    instance per entry: about a third of the model's time on a 100-message answer). One odd
    detail in it (a warning that is not an object, an id that is a number) fails that strict
    reading, and the lenient model reads the answer instead, dropping what it cannot use."""
    global _answer_adapter
    if content.startswith(_BOM):
        content = content[len(_BOM) :]  # JSON parsers may ignore one (RFC 8259); most do
    if _answer_adapter is None:
        _answer_adapter = TypeAdapter(_typed_dict(SaveMessageResponseBody, {}))
    try:
        return _answer_adapter.validate_json(content)
    except ValidationError:
        return SaveMessageResponseBody.model_validate_json(content).model_dump(exclude_none=True)
