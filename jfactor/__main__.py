from jfactor.cli import app

app(prog_name="jfactor")
