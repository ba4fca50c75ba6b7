from stockade.entry import main

main()
