"""Files in the session's workspace: list, read, write, download, upload, delete, move, mkdir."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from crogia.api.deps import LiveDep, RuntimeDep
from crogia.api.errors import ERRORS
from crogia.api.schemas import (
    ErrorBody,
    FileContent,
    FileItem,
    FileList,
    FileMove,
    FileWrite,
    Message,
    MkdirRequest,
)

FILES_ERRORS = {
    **ERRORS,
    504: {"model": ErrorBody, "description": "The sandbox's daemon made no progress for FILES_TIMEOUT."},
}
router = APIRouter(prefix="/api/sessions/{session_id}/files", tags=["files"], responses=FILES_ERRORS)

PathQuery = Annotated[str, Query(max_length=4096, description="Path relative to the workspace root.")]


@router.get("", response_model=FileList, summary="List a directory")
async def list_files(
    live: LiveDep, path: PathQuery = ".", depth: Annotated[int, Query(ge=1, le=32)] = 1
) -> FileList:
    listing = await live.files.list(path, depth=depth)
    items = [
        FileItem(name=e.name, path=e.path, type=e.type, size=e.size, modified=e.modified) for e in listing
    ]
    return FileList(path=path, items=items, truncated=listing.truncated)


@router.get("/content", response_model=FileContent, summary="Read a text file")
async def read_file(
    live: LiveDep, path: PathQuery, max_bytes: Annotated[int | None, Query(ge=1)] = None
) -> FileContent:
    return FileContent(path=path, content=await live.files.read(path, max_bytes=max_bytes))


@router.post("/content", response_model=Message, summary="Write a text file (creates parent folders)")
async def write_file(body: FileWrite, live: LiveDep) -> Message:
    written = await live.files.write(body.path, body.content)
    return Message(message=f"Wrote {written} bytes to {body.path}")


@router.get(
    "/raw",
    response_class=StreamingResponse,
    summary="Download a file (binary-safe, streamed)",
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def download(live: LiveDep, path: PathQuery) -> StreamingResponse:
    size, chunks = await live.files.download(path)
    name = path.rstrip("/").rsplit("/", 1)[-1].replace('"', "")
    headers = {"Content-Length": str(size), "Content-Disposition": f'attachment; filename="{name}"'}
    return StreamingResponse(chunks, media_type="application/octet-stream", headers=headers)


@router.put(
    "/raw",
    response_model=Message,
    summary="Upload a file (binary-safe, streamed; the body is the file)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def upload(request: Request, live: LiveDep, runtime: RuntimeDep, path: PathQuery) -> Message:
    async def body() -> AsyncIterator[bytes]:
        async for chunk in request.stream():
            if chunk:
                yield chunk

    written = await live.files.upload(path, body(), max_bytes=runtime.settings.request_max_bytes)
    return Message(message=f"Wrote {written} bytes to {path}")


@router.delete("", response_model=Message, summary="Delete a file or (with recursive) a folder")
async def delete(live: LiveDep, path: PathQuery, recursive: bool = False) -> Message:
    await live.files.remove(path, recursive=recursive)
    return Message(message=f"Deleted {path}")


@router.post("/move", response_model=Message, summary="Move or rename within the workspace")
async def move(body: FileMove, live: LiveDep) -> Message:
    await live.files.rename(body.src, body.dst, overwrite=body.overwrite)
    return Message(message=f"Moved {body.src} to {body.dst}")


@router.post("/mkdir", response_model=Message, summary="Create a folder (and its parents)")
async def mkdir(body: MkdirRequest, live: LiveDep) -> Message:
    await live.files.make_dir(body.path)
    return Message(message=f"Created {body.path}")
