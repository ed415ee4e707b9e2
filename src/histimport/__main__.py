from histimport.cli import main

main()
