from capfilt.cli import app

app(prog_name="capfilt")
