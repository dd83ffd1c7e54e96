"""Search: files by glob and text by regex or literal, on ripgrep."""

from __future__ import annotations

from fastapi import APIRouter

from crogia.api.deps import LiveDep, RuntimeDep
from crogia.api.errors import ERRORS
from crogia.api.schemas import FileSearch, FileSearchResult, GrepMatchPublic, GrepResult, GrepSearch

router = APIRouter(prefix="/api/sessions/{session_id}/search", tags=["search"], responses=ERRORS)


@router.post("/files", response_model=FileSearchResult, summary="Find files by glob")
async def search_files(body: FileSearch, live: LiveDep, runtime: RuntimeDep) -> FileSearchResult:
    result = await live.files.search(
        body.pattern,
        body.path,
        file_types=body.file_types,
        include_ignored=body.include_ignored,
        include_hidden=body.include_hidden,
        max_results=body.max_results or runtime.settings.search_max_results,
    )
    return FileSearchResult(
        pattern=body.pattern, path=body.path, matches=result.matches, truncated=result.truncated
    )


@router.post("/grep", response_model=GrepResult, summary="Search text in files")
async def grep(body: GrepSearch, live: LiveDep, runtime: RuntimeDep) -> GrepResult:
    result = await live.files.grep(
        body.pattern,
        body.path,
        file_types=body.file_types,
        regex=body.regex,
        case_sensitive=body.case_sensitive,
        context=body.context,
        include_ignored=body.include_ignored,
        include_hidden=body.include_hidden,
        max_results=body.max_results or runtime.settings.search_max_results,
    )
    matches = [
        GrepMatchPublic(
            file=m.file,
            line=m.line,
            content=m.content,
            context_before=list(m.context_before),
            context_after=list(m.context_after),
        )
        for m in result.matches
    ]
    return GrepResult(pattern=body.pattern, path=body.path, matches=matches, truncated=result.truncated)
