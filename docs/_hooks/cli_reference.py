"""MkDocs hook: fills the CLI reference page with every command's ``--help`` (steindiff.cli.reference)."""

MARKER = "<!-- cli-reference: every command's --help, filled in when the site is built -->"


def on_page_markdown(markdown, page, **kwargs):
    if page.file.src_uri != "cli.md":
        return markdown
    from steindiff.cli.reference import markdown as reference

    if MARKER not in markdown:
        raise ValueError(f"docs/cli.md lost its marker {MARKER!r}")
    return markdown.replace(MARKER, reference())
