from moec.runtime.cli import run

run()
