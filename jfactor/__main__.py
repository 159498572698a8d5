from jfactor.cli import main

main()
